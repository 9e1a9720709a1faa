"""The `flowcloud` command line: the face that dispatches to each part."""
