import subprocess
import sys


def test_import_clipscan_stays_light() -> None:
    code = (
        "import sys, clipscan, clipscan.config, clipscan.fs, clipscan.data.read, clipscan.models.registry, "
        "clipscan.stages.decode, clipscan.stages.embed, clipscan.stages.summarise, clipscan.stages.index, clipscan.stages.discrepancy, clipscan.report.kit, clipscan.report.daf, clipscan.daf, clipscan.rundir, clipscan.runner, "
        "clipscan.tcac, clipscan.stages.tcac.pool, clipscan.stages.tcac.score, clipscan.stages.tcac.collect, clipscan.stages.tcac.figures, clipscan.stages.tcac.repeats, clipscan.stages.text, clipscan.stages.transforms, clipscan.report.tcac, "
        "clipscan.bias, clipscan.stages.bias, clipscan.report.bias, clipscan.data.precomputed, clipscan.stages.vectors, "
        "clipscan.stages.gpu_decode, clipscan.stages.attributes\n"
        "heavy = [m for m in ('torch', 'faiss', 'ray', 'vllm', 'open_clip', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import clipscan pulled in: {out.stdout.strip()}"
