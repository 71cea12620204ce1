"""Backend throughput: encoder forward, encoder forward+backward and a full FCMAE training step per
backend and mask ratio, interleaved in one process so that machine noise hits every row alike.

Reference rows in the same run: timm's dense model (``convnextv2_*`` or ``resnet*``) on the unmasked
image, and the ideal sparse cost = that time x (1 - r).

With ``compile_model`` every compilable row (timm dense, masked-dense ``dense``, ``packed``) is measured
twice, eager and under ``torch.compile``; ratios compare each row with the timm row of the same mode.
The packed rows get the per-sample visible count (static mode), so their compiled graph has no host
sync; spconv and MinkowskiEngine call into their libraries and stay eager.
"""
from __future__ import annotations

import contextlib
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch

from mimsparse.backends import BackendUnavailable, backend_names, get_backend
from mimsparse.errors import ConfigError
from mimsparse.models.decoders import FCMAEDecoder
from mimsparse.models.build import build_encoder
from mimsparse.config import ModelConfig
from mimsparse.train.precision import AMP_DTYPES
from mimsparse.models.fcmae import FCMAE
from mimsparse.models.loss import masked_reconstruction_loss, pixel_targets
from mimsparse.masking import num_masked, random_patch_mask

MEASURES = ("enc_fwd", "enc_fwd_bwd", "train_step")
TIMM_DENSE = "timm-dense"
COMPILABLE = (TIMM_DENSE, "dense", "packed")  # the library backends (spconv, minkowski) stay eager


@dataclass
class Case:
    """One row: a backend (or the timm reference) at one mask ratio."""
    backend: str
    mask_ratio: float
    compiled: bool = False
    effective_mask_ratio: float | None = None  # masked patches / patches at this image size (None: = mask_ratio)
    samples_ms: dict = field(default_factory=lambda: {m: [] for m in MEASURES})
    saved_activation_mb: float = 0.0
    peak_cuda_mb: float | None = None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


@contextlib.contextmanager
def _count_saved_tensors(out: list):
    """Bytes of the tensors autograd saves for backward: the activation memory of a training
    forward, an honest per-row measure on CPU where no allocator statistic exists."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    out.append(sum(seen.values()) / 2**20)


class DenseReference(torch.nn.Module):
    """timm's dense encoder on the whole image + the same FCMAE decoder and loss (all patches)."""

    def __init__(self, name: str, decoder: FCMAEDecoder, patch_size: int):
        super().__init__()
        import timm

        self.encoder = timm.create_model(name, num_classes=0)
        self.decoder = decoder
        self.patch_size = patch_size

    def forward(self, images, visible):
        feats = self.encoder.forward_features(images)
        pred = self.decoder(feats, visible).flatten(2).transpose(1, 2)
        target = pixel_targets(images, self.patch_size, True)
        return masked_reconstruction_loss(pred, target, visible.flatten(1))


def _runners(model_name, backend_name, ratio, images, device, amp_dtype, compile_model, seed, compile_mode=None):
    """Three zero-argument callables (encoder fwd, encoder fwd+bwd, train step) for one case."""
    torch.manual_seed(seed)
    b, _, h, w = images.shape
    grid = (h // 32, w // 32)
    visible = random_patch_mask(b, grid, ratio, torch.Generator().manual_seed(seed), device)
    if backend_name == TIMM_DENSE:
        model = DenseReference(model_name, FCMAEDecoder(build_encoder(ModelConfig(name=model_name)).num_features, 32), 32)
        visible = torch.zeros_like(visible)  # every patch is a target: the cost of a dense step
        model.to(device)
        encode = lambda: model.encoder.forward_features(images)
        step_loss = lambda: model(images, visible)
    else:
        model = FCMAE(build_encoder(ModelConfig(name=model_name), backend_name), mask_ratio=ratio).to(device)
        # compiled packed: the count every mimsparse mask has, so its indices need no host sync (static
        # mode); eager packed keeps its default path (what train.compile=off runs)
        n = model.visible_count(grid) if backend_name == "packed" and compile_model else None
        encode = lambda: model.encoder(images, visible, num_visible=n)
        step_loss = lambda: model(images, visible, num_visible=n)[0]
    encode_eager = encode  # saved-tensor hooks count activations; they need the eager graph
    if compile_model:
        encode = torch.compile(encode, mode=compile_mode, dynamic=False)
        step_loss = torch.compile(step_loss, mode=compile_mode, dynamic=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    # CUDA graphs (reduce-overhead) reuse their output memory: each call starts a new step
    new_step = torch.compiler.cudagraph_mark_step_begin if compile_mode == "reduce-overhead" else lambda: None

    def enc_fwd():
        new_step()
        with torch.no_grad(), autocast():
            encode()

    def enc_fwd_bwd():
        new_step()
        with autocast():
            out = encode()
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def train_step():
        new_step()
        with autocast():
            loss = step_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def activation_mb(out: list):
        with _count_saved_tensors(out), autocast():
            encode_eager()

    return {"enc_fwd": enc_fwd, "enc_fwd_bwd": enc_fwd_bwd, "train_step": train_step}, activation_mb


def run_benchmark(model: str = "convnextv2_atto", backends=("dense", "packed"), mask_ratios=(0.0, 0.6),
                  batch: int = 8, img: int | tuple[int, int] = 224, device: str = "cpu", repeats: int = 5, warmup: int = 1,
                  amp: str = "none", compile_model: bool = False, seed: int = 0, log=print,
                  compile_mode: str | None = None, measures=MEASURES, compiled_only=(),
                  deadline: float | None = None) -> dict:
    """``measures``: a subset of MEASURES to time (each compiled row compiles one graph per measure,
    minutes each on a small CPU); the others are reported as not measured. ``compiled_only``: backends
    whose eager rows are left out when compiling (e.g. masked-dense, whose eager cost is timm's).

    ``deadline`` (a ``time.monotonic()`` value) bounds the run for a machine lent by the minute: rows are
    prepared (built, compiled, warmed up) in order, the timm reference first, then every backend at the
    first ratio, then the next ratio; a row not started by the deadline is listed in ``skipped`` as
    "time budget", and the repeats stop once the deadline has passed (at least one is always taken)."""
    unknown = set(measures) - set(MEASURES)
    if unknown or not measures:
        raise ValueError(f"measures must be a non-empty subset of {', '.join(MEASURES)}, got {', '.join(measures)}")
    dev = torch.device(device)
    amp_dtype = AMP_DTYPES[amp]
    height, width = (img, img) if isinstance(img, int) else img  # square, or (H, W)
    if height == width:
        img = height  # recorded as one number, as before
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)).to(dev)
    unknown = [name for name in backends if name not in backend_names()]
    if unknown:
        raise ConfigError(f"unknown backend(s) {', '.join(map(repr, unknown))} in --backends; the backends are "
                          f"{', '.join(backend_names())}")
    effective = {float(r): effective_mask_ratio(float(r), height, width) for r in mask_ratios}
    skipped, runners, cases, usable = {}, {}, [], []
    for name in backends:
        try:
            backend = get_backend(name)
            if amp_dtype is not None:
                backend.check_dtype(amp_dtype, dev)
        except (BackendUnavailable, TypeError) as e:
            skipped[name] = str(e)
            log(f"skipping backend {name}: {e}")
            continue
        usable.append(name)
    for r in mask_ratios:  # ratio-major: under a deadline every backend gets the first ratio
        for name in usable:
            if not (compile_model and name in COMPILABLE and name in compiled_only):
                cases.append(Case(name, float(r), effective_mask_ratio=effective[float(r)]))
            if compile_model and name in COMPILABLE:
                cases.append(Case(name, float(r), compiled=True, effective_mask_ratio=effective[float(r)]))
    cases.insert(0, Case(TIMM_DENSE, 0.0))
    if compile_model:
        cases.insert(1, Case(TIMM_DENSE, 0.0, compiled=True))
        eager = sorted({c.backend for c in cases if c.backend not in COMPILABLE})
        if eager:
            log(f"--compile: {', '.join(eager)} call(s) into their libraries and stay eager")
    prepared = []
    for case in _prepare_order(cases, mask_ratios) if deadline is not None else cases:
        if deadline is not None and prepared and time.monotonic() > deadline:  # the reference always runs
            name = f"{label(vars(case))} r={case.mask_ratio:.2f}"
            skipped[name] = "time budget: not started before the deadline"
            log(f"time budget: {name} not measured")
            continue
        prepared.append(case)
        if case.compiled:
            log(f"compiling {case.backend} r={case.mask_ratio} (encoder fwd, fwd+bwd, train step)...")
        fns, act = _runners(model, case.backend, case.mask_ratio, images, dev, amp_dtype, case.compiled, seed,
                            compile_mode)
        fns = {m: fns[m] for m in MEASURES if m in measures}
        runners[id(case)] = fns
        out = []
        act(out)
        case.saved_activation_mb = round(out[0], 2)
        for _ in range(warmup):
            for fn in fns.values():
                fn()
    started = {id(c) for c in prepared}
    cases, repeats_done = [c for c in cases if id(c) in started], 0  # table order
    for rep in range(repeats):
        if rep > 0 and deadline is not None and time.monotonic() > deadline:
            log(f"time budget: stopped after {rep} of {repeats} repeats")
            break
        repeats_done += 1
        for case in cases:  # interleaved: every repeat visits every case
            for measure, fn in runners[id(case)].items():
                if dev.type == "cuda" and rep == 0:
                    torch.cuda.reset_peak_memory_stats(dev)
                case.samples_ms[measure].append(_timed(fn, dev))
                if dev.type == "cuda" and rep == 0:
                    case.peak_cuda_mb = max(case.peak_cuda_mb or 0, torch.cuda.max_memory_allocated(dev) / 2**20)
        log(f"repeat {rep + 1}/{repeats} done")
    return summarize(cases, skipped, dict(model=model, batch=batch, img=img, device=device, repeats=repeats_done,
                                          warmup=warmup, amp=amp, compile=compile_model, compile_mode=compile_mode,
                                          mask_ratios=list(mask_ratios),
                                          backends=list(backends)))


def _prepare_order(cases: list[Case], mask_ratios) -> list[Case]:
    """Under a deadline the rows that answer the main question start first: the eager reference, every
    backend at the first ratio (compiled rows before eager ones), the compiled reference, then the
    other ratios."""
    first = float(mask_ratios[0]) if len(mask_ratios) else 0.0

    def key(item):
        i, c = item
        if c.backend == TIMM_DENSE:
            return (2 if c.compiled else 0, 0, i)
        return (1 if c.mask_ratio == first else 3, 0 if c.compiled else 1, i)

    return [c for _, c in sorted(enumerate(cases), key=key)]


def summarize(cases: list[Case], skipped: dict, settings: dict) -> dict:
    """Medians, spreads and the ratios to the dense-unmasked and ideal rows (computed, not measured);
    compiled rows are compared with the compiled timm row."""
    refs = {c.compiled: {m: statistics.median(c.samples_ms[m]) for m in MEASURES if c.samples_ms[m]}
            for c in cases if c.backend == TIMM_DENSE}
    rows = []
    for c in cases:
        ref_median = refs.get(c.compiled, {})  # compiled rows against the compiled reference only
        masked = c.mask_ratio if c.effective_mask_ratio is None else c.effective_mask_ratio
        row = {"backend": c.backend, "mask_ratio": c.mask_ratio, "effective_mask_ratio": masked, "compiled": c.compiled,
               "saved_activation_mb": c.saved_activation_mb, "peak_cuda_mb": c.peak_cuda_mb, "samples_ms": c.samples_ms}
        for m in MEASURES:
            s = c.samples_ms[m]
            if not s:
                row[m] = None  # not measured (``measures``)
                continue
            med = statistics.median(s)
            ref = ref_median.get(m)  # None: that reference was not measured (time budget)
            ideal = None if ref is None else ref * (1.0 - masked)  # the share of patches really kept
            row[m] = {"median_ms": med, "min_ms": min(s), "max_ms": max(s),
                      "images_per_s": settings["batch"] / (med / 1e3),
                      "ratio_to_dense": None if ref is None else med / ref,
                      "ratio_to_ideal": med / ideal if ideal else None}
        rows.append(row)
    return {"settings": settings, "machine": machine_info(), "rows": rows, "skipped": skipped}


def machine_info() -> dict:
    import timm

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": str(torch.__version__), "timm": timm.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for pkg in ("spconv", "MinkowskiEngine"):
        try:
            from importlib.metadata import version
            info[pkg] = version({"spconv": "spconv-cu120"}.get(pkg, pkg))
        except Exception:
            pass
    return info


def markdown_table(result: dict) -> str:
    lines = ["| backend | mask r | enc fwd ms | enc fwd+bwd ms | ×dense | ×ideal | train step ms | ×dense | ×ideal | img/s (step) | saved act. MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "–" if x is None else f"{x:.2f}"
    ms = lambda x: "–" if x != x else f"{x:.1f}"  # nan: not measured
    nm = dict.fromkeys(("median_ms", "min_ms", "max_ms", "ratio_to_dense", "ratio_to_ideal", "images_per_s"))
    for r in result["rows"]:
        f, fb, ts = (r[m] or {**nm, "median_ms": float("nan")} for m in MEASURES)  # nan: not measured
        spread = "" if fb["min_ms"] is None else f" ({fb['min_ms']:.0f}–{fb['max_ms']:.0f})"
        lines.append(f"| {label(r)} | {ratio_text(r)} | {ms(f['median_ms'])} | "
                     f"{ms(fb['median_ms'])}{spread} | {fmt(fb['ratio_to_dense'])} | "
                     f"{fmt(fb['ratio_to_ideal'])} | {ms(ts['median_ms'])} | {fmt(ts['ratio_to_dense'])} | "
                     f"{fmt(ts['ratio_to_ideal'])} | {fmt(ts['images_per_s'])} | {r['saved_activation_mb']:.0f} |")
    for name, why in result["skipped"].items():
        lines.append(f"| {name} | skipped: {why} | | | | | | | | | |")
    return "\n".join(lines)


def effective_mask_ratio(ratio: float, height: int, width: int, patch: int = 32) -> float:
    """The share of patches a mask of ``ratio`` really removes at this size (round(r x L) of L); a ratio
    that leaves no patch visible is refused: there is nothing to encode, and x ideal would divide by 0."""
    patches = (height // patch) * (width // patch)
    masked = num_masked(ratio, patches)
    if patches and masked >= patches:
        raise ConfigError(f"mask ratio {ratio:g} at {height}x{width} masks all {patches} patches of {patch}x{patch} "
                          f"(none visible); use a ratio below {(patches - 0.5) / patches:.3g} or a larger --img-size")
    return masked / patches if patches else ratio


def ratio_text(row: dict) -> str:
    """The mask ratio column: the effective ratio, with the one asked for when rounding changed it."""
    asked, real = row["mask_ratio"], row.get("effective_mask_ratio", row["mask_ratio"])
    return f"{real:.2f}" if abs(real - asked) < 5e-3 else f"{real:.2f} (asked {asked:.2f})"


def label(row: dict) -> str:
    return row["backend"] + (" (compiled)" if row.get("compiled") else "")


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    measure = next(m for m in ("enc_fwd_bwd", "train_step", "enc_fwd") if rows[0][m])  # first one measured
    ref = next(r for r in rows if r["backend"] == TIMM_DENSE and not r.get("compiled"))[measure]["median_ms"]
    ratios = sorted({r["mask_ratio"] for r in rows if r["backend"] != TIMM_DENSE})
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ratios, [ref * (1 - r) for r in ratios], "k--", label="ideal = timm dense × (1 − r)")
    ax.axhline(ref, color="gray", lw=1, label="timm dense, unmasked")
    for name in dict.fromkeys(label(r) for r in rows if r["backend"] != TIMM_DENSE):
        pts = sorted((r["mask_ratio"], r[measure]["median_ms"]) for r in rows if label(r) == name)
        ax.plot(*zip(*pts), "o-", label=name)
    s = result["settings"]
    ax.set(xlabel="mask ratio", ylabel=f"{measure} (ms)",
           title=f"{s['model']} B={s['batch']} {s['img'] if isinstance(s['img'], int) else 'x'.join(map(str, s['img']))}px "
                 f"{s['device']}")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


NOISY_SPREAD = 0.25  # (max - min) / median above this: the machine was busy, the medians are uncertain


def noisy_rows(result: dict, threshold: float = NOISY_SPREAD) -> list[str]:
    """One line per row and measure whose min-max spread exceeds ``threshold`` of its median."""
    lines = []
    for row in result["rows"]:
        for m in MEASURES:
            s = row[m]
            if s is None:  # not measured (``measures``)
                continue
            spread = (s["max_ms"] - s["min_ms"]) / s["median_ms"]
            if spread > threshold:
                lines.append(f"{row['backend']} mask {row['mask_ratio']:.2f} {m}: {s['min_ms']:.1f}-{s['max_ms']:.1f} ms "
                             f"around a median of {s['median_ms']:.1f} ({spread:.0%} spread)")
    return lines
