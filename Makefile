# Two commands do everything on a fresh machine:
#   make demo   the main job (20 scripted pick-cube demos, then SERL trained to 90% success)
#   make test   the test suite
# Both create .venv and install what is missing, Debian packages included (apt-get when root).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.robolearn-installed
# libosmesa6: headless MuJoCo rendering on CPU; libusb-1.0-0: pyrealsense2; tmux: the keyboard-teleop tests drive `robolearn record` in a real terminal.
APT_PACKAGES := libosmesa6 libusb-1.0-0 tmux
# A pinned torch: on machines that carry its CPU wheel pip takes that one; elsewhere PyPI's
# build (CUDA on Linux x86_64). Override for another index, e.g. TORCH_SPEC="torch==2.13.0 --index-url URL".
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= sim,test,ros,realsense,formats,teleop

# Every process the tests start keeps DDS on loopback, in a domain of its own.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_LOCALHOST_ONLY := 1

.PHONY: demo test setup sysdeps bench clean

# The main job: 20 scripted pick-cube demonstrations, then SERL (RLPD) from states, with SERL's CPU
# setting (serl.CPU_OVERRIDES) and DroQ's dropout critic (docs/agent_variants.md: 3-6k env steps to
# 90% on 5 seeds against 4-9k without it), until eval success >= 90% or 20k env steps; checkpoint, learning curve and eval video under runs/demo/;
# then the trained policy deployed through the ROS 2 launch file (agent_node against
# sim_robot_node over DDS on loopback) for 10 episodes, printing their success.
DEMO_ENV := robolearn/PandaPickCube-v0
DEMO_ENV_SET := --env-set terminate_on_success=false
demo: setup
	rm -rf runs/demo
	$(VENV)/bin/robolearn rollout --env $(DEMO_ENV) --policy scripted --episodes 20 --seed 10000 \
		$(DEMO_ENV_SET) --record runs/demo/demos
	$(VENV)/bin/robolearn train --agent serl --env $(DEMO_ENV) --demos runs/demo/demos $(DEMO_ENV_SET) \
		--set num_critics=2 --set utd_ratio=8 --set nstep=3 --set critic_dropout=0.01 \
		--frames 20000 --eval-every 1000 \
		--target-success 0.9 --out runs/demo/serl
	$(VENV)/bin/robolearn launch launch/deploy.launch.xml backend:=sim checkpoint:=runs/demo/serl \
		episodes:=10 seed:=2000000
	@echo "demonstrations:  runs/demo/demos"
	@echo "checkpoint:      runs/demo/serl/checkpoints"
	@echo "learning curve:  runs/demo/serl/learning_curve.png"
	@echo "eval video:      runs/demo/serl/eval.mp4"

# The suite in TEST_WORKERS parallel pytest workers, a test file per worker at a time, the learning tests first on one
# worker (tests/conftest.py; each worker its own ROS domains), then the few `serial` tests that measure the machine's
# load. tests/conftest.py draws the ROS domain (robolearn.launcher.random_domain).
# PYTEST_ARGS: more pytest options for the parallel part (not the serial one), e.g. PYTEST_ARGS="--junitxml=runs/tests.xml" (per-test times).
TEST_WORKERS ?= 2
PYTEST_ARGS ?=
test: setup
	$(VENV)/bin/ruff check .
	@$(PY) -m pytest -q -n $(TEST_WORKERS) --max-worker-restart 0 --dist loadfile --no-loadscope-reorder -m "not serial" \
		--durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest ran no tests; that is a failure" >&2; exit 5; fi; \
	if [ $$rc -gt 1 ]; then exit $$rc; fi; \
	$(PY) -m pytest -q -m serial; rc2=$$?; [ $$rc2 -eq 5 ] && rc2=0; \
	if [ $$rc -eq 0 ]; then rc=$$rc2; fi; \
	exit $$rc

bench: setup
	$(PY) bench/sim_throughput.py

setup: sysdeps $(STAMP)

sysdeps:
	@command -v dpkg >/dev/null || { echo "sysdeps: not a Debian system; install the equivalents of: $(APT_PACKAGES)"; exit 0; }; \
	missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "sysdeps: apt-get install$$missing"; \
		apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq >/dev/null && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing >/dev/null; \
	else \
		echo "robolearn needs Debian packages that are missing:$$missing" >&2; \
		echo "install them with:  sudo apt-get install -y$$missing   then run make again" >&2; exit 1; \
	fi

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "robolearn needs Python >= 3.11 ($(PYTHON) is older); run: make PYTHON=python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	@# setuptools' editable-install notice (a folder named like the package) is expected for this layout.
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $@

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache .hypothesis
