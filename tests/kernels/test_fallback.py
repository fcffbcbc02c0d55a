# Without the extension (or with FACECL_FORCE_REFERENCE=1) toolkit.ops runs the references after one warning.
import json
import os
import subprocess
import sys

import pytest

import toolkit.ops as ops
from tests.conftest import REPO
from tests.kernels.conftest import requires_kernels

# Imports toolkit.ops, calls every public function twice with autograd, compares with the references,
# prints what happened as JSON. `prelude` runs first (e.g. to hide the extension).
PROBE = r"""
import json, warnings
warnings.simplefilter("always")
{prelude}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import toolkit.ops as ops
    from toolkit.heads.margin import Margin
    from toolkit.contrastive.unicon import unicon_loss_reference
    from toolkit.heads.margin import margin_softmax_ce_reference
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(6, 8, generator=gen, requires_grad=True)
    centers = torch.randn(9, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 9, (6,), generator=gen)
    errors = []
    for _ in range(2):
        e, c = F.normalize(emb, dim=1), F.normalize(centers, dim=1)
        losses = [ops.margin_softmax_ce(e @ c.t(), labels, Margin()).mean(),
                  ops.linear_margin_softmax_ce(e, c, labels, Margin()).mean(),
                  ops.distributed_margin_softmax_ce(e @ c.t(), labels, Margin()),
                  ops.distributed_linear_margin_softmax_ce(e, c, labels, Margin())]
        expected = margin_softmax_ce_reference(emb, centers, labels, Margin())
        errors += [abs(float(loss - expected)) for loss in losses]
        sum(losses).backward()
        q = F.normalize(emb, dim=1)
        own = torch.arange(6)
        unicon = ops.unicon_loss(q, q, labels, labels, own, 0.1)
        errors.append(float((unicon - unicon_loss_reference(q, q, labels, labels, own, 0.1)).abs().max()))
print(json.dumps({{
    "available": ops.FUSED_KERNELS_AVAILABLE,
    "max_error": max(errors),
    "kernel_warnings": [str(w.message) for w in caught if issubclass(w.category, ops.FusedKernelsUnavailableWarning)],
    "other_toolkit_warnings": [str(w.message) for w in caught
                               if not issubclass(w.category, ops.FusedKernelsUnavailableWarning)
                               and "toolkit" in str(w.filename)],
}}))
"""


def _probe(env_update: dict, prelude: str = "") -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env_update}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(prelude=prelude)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_force_reference_env_var_gives_one_warning_and_reference_results():
    result = _probe({ops.FORCE_REFERENCE_ENV: "1"})
    assert result["available"] is False
    assert len(result["kernel_warnings"]) == 1, result["kernel_warnings"]
    assert "FACECL_FORCE_REFERENCE=1 is set" in result["kernel_warnings"][0]
    assert result["other_toolkit_warnings"] == []
    assert result["max_error"] < 1e-5


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_missing_extension_gives_one_warning_and_reference_results():
    # sys.modules[name] = None makes `from toolkit import _C` raise ImportError, as if it had never been built.
    result = _probe({ops.FORCE_REFERENCE_ENV: "0"}, prelude="import sys; sys.modules['toolkit._C'] = None")
    assert result["available"] is False
    assert len(result["kernel_warnings"]) == 1, result["kernel_warnings"]
    assert "toolkit._C could not be loaded" in result["kernel_warnings"][0]
    assert "pip install -e ." in result["kernel_warnings"][0]
    assert result["max_error"] < 1e-5


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
@pytest.mark.skipif(os.environ.get(ops.FORCE_REFERENCE_ENV, "") not in ("", "0"),
                    reason="FACECL_FORCE_REFERENCE is set in this environment")
def test_extension_is_built_and_loaded():
    """The install builds the kernels: without them the fused tests would all be skipped."""
    assert ops.FUSED_KERNELS_AVAILABLE, f"toolkit._C is not usable: {ops.UNAVAILABLE_REASON}"
    result = _probe({ops.FORCE_REFERENCE_ENV: ""})
    assert result["available"] is True and result["kernel_warnings"] == []
    assert result["max_error"] < 1e-5


HEAD_IMPLEMENTATIONS = r"""
import json, warnings
warnings.simplefilter("ignore")
from toolkit.errors import ConfigError
from toolkit.heads import Margin, ShardedIdentityCenterHead
chosen = {}
for requested in ("auto", "reference", "fused", "fused_linear"):
    try:
        chosen[requested] = ShardedIdentityCenterHead(10, 4, Margin(), implementation=requested).implementation
    except ConfigError as exc:
        chosen[requested] = "error: " + str(exc)
print(json.dumps(chosen))
"""


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_head_implementation_means_what_it_says_without_kernels():
    """'auto' falls back to the unfused path; 'fused' and 'fused_linear' refuse instead of falling back silently."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", ops.FORCE_REFERENCE_ENV: "1"}
    proc = subprocess.run([sys.executable, "-c", HEAD_IMPLEMENTATIONS], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert chosen["auto"] == "reference" and chosen["reference"] == "reference"
    for name in ("fused", "fused_linear"):
        assert chosen[name].startswith(f"error: head.implementation '{name}' needs the fused kernels"), chosen[name]
        assert "FACECL_FORCE_REFERENCE=1 is set" in chosen[name]


@requires_kernels
def test_auto_is_the_fused_linear_head_when_the_kernels_are_built():
    """The default head.implementation ('auto') runs the fastest, leanest path: fused_linear (bench_head.py)."""
    from toolkit.config.schema import HeadConfig
    from toolkit.heads import Margin, ShardedIdentityCenterHead

    assert HeadConfig().implementation == "auto"
    assert ShardedIdentityCenterHead(10, 4, Margin(), implementation="auto").implementation == "fused_linear"
