"""Assemble BENCHMARKS.md from the per-area result files in benchmarks/ (each written next to its script).

    python benchmarks/make_benchmarks_md.py
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
AREAS = [("train.md", "Training"), ("engine.md", "Inference engine"), ("serve.md", "Server"),
         ("fp8.md", "FP8"), ("rl.md", "Reinforcement learning"),
         ("speedrun.md", "Speedrun")]

HEADER = """# Benchmarks

Every number here was produced by a script in `benchmarks/`, never by a timed test. Each section gives the
command, the machine and the date. The development machine is a 2-core CPU box with 24 GiB RAM and no GPU.
During the first session other jobs shared those two cores (load average 4–10), so absolute throughput from
that session is pessimistic. Read the ratios, which are measured against the named peer in the same process.
The second session's runs (RL throughput, the `cpu` speedrun) had the box to themselves.

No GPU has been lent to this project so far, so the GPU rows are not measured yet.

"""


def main() -> None:
    parts = [HEADER]
    for name, title in AREAS:
        f = ROOT / name
        if not f.exists():
            parts.append(f"## {title}\n\nNot measured yet (`benchmarks/{name}` missing).\n\n")
            continue
        text = f.read_text().strip()
        # demote the area file's headings one level so they nest under this document's title
        lines = [("#" + ln) if ln.startswith("#") else ln for ln in text.splitlines()]
        parts.append("\n".join(lines) + "\n\n")
    (ROOT.parent / "BENCHMARKS.md").write_text("".join(parts).rstrip() + "\n")


if __name__ == "__main__":
    main()
