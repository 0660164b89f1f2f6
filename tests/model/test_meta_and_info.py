"""The full 744B config builds on the meta device, and glm5 info reports the published numbers."""

import json
import subprocess
import sys

from glm5.info import info


def test_full_glm5_on_meta_device_allocates_nothing():
    code = (
        "import resource, time, torch\n"
        "from glm5 import GLM5ForCausalLM, preset\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t = time.time()\n"
        "with torch.device('meta'):\n"
        "    m = GLM5ForCausalLM(preset('glm5'))\n"
        "dt = time.time() - t\n"
        "assert all(p.is_meta for p in m.parameters())\n"
        "n = sum(p.numel() for p in m.parameters())\n"
        "r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(n, dt, (r1 - r0) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    n, seconds, rss_mb = int(out[0]), float(out[1]), float(out[2])
    assert n == 753_864_119_552
    assert rss_mb < 500  # python objects only; 1.5 TB of weights were never allocated
    assert seconds < 60  # "in seconds" (generous bound for a loaded 2-core CI box)


def test_info_glm5_published_numbers():
    st = info("glm5")
    assert st["params_total_no_mtp"] == 743_911_199_232
    assert st["checkpoint_elements_with_mtp"] == 753_864_139_008
    assert st["params_total_with_mtp"] == 753_864_119_552
    assert st["params_activated_per_token"] == 40_833_126_912
    assert st["bytes_bf16_no_mtp"] == 1_487_822_398_464  # ≈1.488 TB
    assert st["bytes_bf16_with_mtp"] == 1_507_728_316_928
    assert st["params_activated_mtp_step"] == 591_233_792
    assert st["kv_cache_bytes_per_token_bf16"] == (576 + 128) * 78 * 2
    # the reference's table: FP8 latent (656 B) + FP8 indexer (132 B) = 61,464 B per token, 12.5 GB at 202,752 tokens
    assert st["kv_cache_bytes_per_token_fp8"] == 61_464
    assert round(st["kv_cache_bytes_full_context_fp8"] / 1e9, 1) == 12.5
    assert 0.49 < st["bytes_fp8_with_mtp"] / st["bytes_bf16_with_mtp"] < 0.51


def test_info_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "glm5.cli", "info", "glm5"], capture_output=True, text=True, check=True)
    assert "743,911,199,232" in out.stdout and "753,864,139,008" in out.stdout and "40,833,126,912" in out.stdout
    assert "1.488TB" in out.stdout
    js = subprocess.run([sys.executable, "-m", "glm5.cli", "info", "glm5-nano", "--json"], capture_output=True,
                        text=True, check=True)
    assert json.loads(js.stdout)["params_total_no_mtp"] > 0
    bad = subprocess.run([sys.executable, "-m", "glm5.cli", "info", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode != 0 and "neither" in bad.stderr


def test_info_per_rank_bytes_under_tensor_parallelism():
    """GLM-5 at 8 ranks: the split and replicated parts add up to a per-rank share, and the FP8 weights fit one H200;
    a split that would cut FP8 scale blocks says so."""
    one = info("glm5")
    st = info("glm5", 8)["tensor_parallel"]
    bf16, fp8 = st["bytes_bf16_per_rank"], st["bytes_fp8_per_rank"]
    assert one["bytes_bf16_with_mtp"] / 8 < bf16 < one["bytes_bf16_with_mtp"] / 7  # mostly split, a little replicated
    assert 0.45 < fp8 / bf16 < 0.55 and fp8 < 141e9
    assert info("glm5", 8, expert_parallel=True)["tensor_parallel"]["bytes_fp8_per_rank"] == fp8
    assert "FP8 scale blocks" in info("glm5-nano", 2)["tensor_parallel"]["bytes_fp8_per_rank"]
