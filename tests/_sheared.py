"""One tiny sheared model, made the way a user makes one, shared by the after-the-shear tests (model card,
GGUF, evaluation): session fixture `sheared`, registered in conftest.py.

    source    a random model of yamls/tiny/prune.yaml's shape in a Hub-cache-like folder
              (models--acme--tiny-src/snapshots/0123), with a card naming license apache-2.0
    prune     yamls/tiny/prune.yaml, 4 batches (eval at 2 and 4), in this process
    cut       `llmshearing prune-export ... --hf cut_hf --tokenizer tok`
    cpt       yamls/tiny/cpt.yaml from the cut model, 4 batches (eval at 2 and 4)
    hf        `llmshearing convert composer-to-hf cpt/latest-rank0.pt hf --tokenizer tok`

About 45 s on 2 cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from _tiny_data import make_tiny_data, tiny_model_dirs

BATCHES, GLOBAL_BATCH, SEQ_LEN = 4, 16, 128
LICENSE = "apache-2.0"
SOURCE_CARD = f"---\nlicense: {LICENSE}\nlanguage: [en]\n---\n\n# tiny source\n"


@dataclass
class Sheared:
    root: Path
    data: Path
    raw: Path
    tok: Path
    source: Path
    prune_ckpt: Path
    cut: Path
    cut_hf: Path
    cpt_ckpt: Path
    hf: Path


def _run(yaml: str, data: Path, model: Path, save: Path, *extra: str) -> Path:
    from llmshearing.demo.stages import train

    tr, _ = train(yaml, [f"data.root={data}", f"model.path={model}", f"max_duration={BATCHES}ba",
                         f"save_interval={BATCHES}ba", "eval_interval=2ba", f"save_folder={save}",
                         "loggers.console=false", "autoresume=false", f"global_train_batch_size={GLOBAL_BATCH}",
                         f"data.seq_len={SEQ_LEN}", *extra])
    tr.close()
    return save / "latest-rank0.pt"


def make_sheared(root: Path) -> Sheared:
    import shutil

    from llmshearing.cli import main

    data = make_tiny_data(root / "tiny", seq_len=SEQ_LEN)
    src, _ = tiny_model_dirs(data, root / "models")
    source = root / "hub" / "models--acme--tiny-src" / "snapshots" / "0123"
    shutil.copytree(src, source)
    (source / "README.md").write_text(SOURCE_CARD)
    tok = data.parent / "tokenizer"
    prune_ckpt = _run("prune.yaml", data, source, root / "runs" / "prune", "model.init=null")
    cut, cut_hf, hf = root / "cut", root / "cut_hf", root / "hf"
    assert main(["prune-export", str(prune_ckpt), str(cut), "--hf", str(cut_hf), "--tokenizer", str(tok)]) == 0
    cpt_ckpt = _run("cpt.yaml", data, cut, root / "runs" / "cpt")
    assert main(["convert", "composer-to-hf", str(cpt_ckpt), str(hf), "--tokenizer", str(tok)]) == 0
    return Sheared(root=root, data=data, raw=data.parent / "raw", tok=tok, source=source, prune_ckpt=prune_ckpt,
                   cut=cut, cut_hf=cut_hf, cpt_ckpt=cpt_ckpt, hf=hf)


@pytest.fixture(scope="session")
def sheared(tmp_path_factory) -> Sheared:
    return make_sheared(tmp_path_factory.mktemp("sheared"))
