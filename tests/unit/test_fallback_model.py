"""The edge's fallback model: the bundled ONNX export runs without torch and agrees with the
torch model it was exported from."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from support.cli import REPO

from edge.fallback import BUNDLED_MODEL, FallbackModel
from flowcloud.inference import Segmenter
from flowcloud.zoo import load_model
from training.synth import SceneSequence


def test_the_edge_segments_without_importing_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from edge.fallback import BUNDLED_MODEL, FallbackModel\n"
        "import edge.daemon\n"
        "m = FallbackModel(BUNDLED_MODEL)\n"
        "assert m.segment(np.zeros((64, 96, 3), np.uint8)).shape == (256, 512)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_onnx_export_agrees_with_the_torch_model() -> None:
    model = FallbackModel(BUNDLED_MODEL)
    scene, _ = SceneSequence(seed=3, width=512, height=256).frame(0)
    edge = model.segment(scene)
    cloud = Segmenter(load_model()).predict([scene])[0]
    assert (edge == np.asarray(cloud)).mean() > 0.99
