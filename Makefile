# Two commands from a fresh clone: `make demo` (install everything, pretrain, convert) and `make test`.
PY := .venv/bin/python
BACKEND ?= minkowski
RUN ?= runs/fcmae_atto
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test benchmark minkowski-cuda clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) tools/pretrain.py --config configs/fcmae_atto.yaml --backend $(BACKEND) --output-dir $(RUN) --resume auto
	$(PY) tools/convert_to_dense.py $$(ls $(RUN)/checkpoint-[0-9]*.pth | tail -n 1) -o $(RUN)/convnextv2_atto-timm.safetensors
	@echo "checkpoints and log: $(RUN)/   dense timm weights: $(RUN)/convnextv2_atto-timm.safetensors"

# pytest exits 5 when it collected no test: that is a failure, not a pass. One worker per core
# (pytest-xdist), each test file whole in one worker (its module fixtures, e.g. a compile, built once).
test: setup
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile --durations=15 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

# MinkowskiEngine built for CUDA (sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise), installed into
# .venv in place of the CPU build; needs no GPU to build. Long (see README): not part of setup, test or CI.
minkowski-cuda: setup
	MINKOWSKI_FLAVOR=cuda bash scripts/build_minkowski.sh $(PY)

benchmark: setup
	$(PY) tools/benchmark.py --model convnextv2_atto --backends dense,packed,spconv,minkowski --device cpu

clean:
	rm -rf runs .pytest_cache
