"""Every yaml in yamls/ loads and validates; bad configs fail before training, naming the key."""

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from llmshearing.convert.checkpoint import save_domain_weights
from llmshearing.models.config import ModelConfig
from llmshearing.models.shape import ModelShape
from llmshearing.training.config import ConfigError, load_config
from llmshearing.training.config_checks import validate

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted(p for p in (REPO / "yamls").rglob("*.yaml"))

LLAMA2_7B = ModelShape(4096, 32, 32, 128, 32, 11008, 32000)
LLAMA31_8B = ModelShape(4096, 32, 8, 128, 32, 14336, 128256)
SOURCES = {  # model.path in the yamls -> the source shape it stands for
    "ckpts/llama2-7b": LLAMA2_7B,
    "ckpts/llama31-8b": LLAMA31_8B,
    "ckpts/pruned-2.7b": ModelShape(2560, 20, 20, 128, 32, 6912, 32000),
    "ckpts/pruned-1.3b": ModelShape(2048, 16, 16, 128, 24, 5504, 32000),
}


def fake_model_dir(tmp: Path, shape: ModelShape) -> str:
    """A model dir with a real config and a placeholder weights file (validation never reads weights)."""
    d = tmp / "model"
    d.mkdir(exist_ok=True)
    (d / "llmshearing.json").write_text(json.dumps(ModelConfig(shape).to_dict()))
    save_file({}, str(d / "model.safetensors"))  # a valid, empty weights file: validation reads headers only
    return str(d)


def fake_data_root(tmp: Path, domains, splits=("train", "eval")) -> str:
    for s in splits:
        for dom in domains:
            (tmp / "data" / s / dom).mkdir(parents=True, exist_ok=True)
    return str(tmp / "data")


def overrides_for(path: Path, tmp: Path) -> list[str]:
    raw = load_config_raw(path)
    ov = []
    model_path = raw.get("model", {}).get("path")
    domains = raw["data"]["domains"]
    if model_path is not None:
        shape = SOURCES.get(model_path, ModelShape(64, 4, 4, 16, 3, 64, 512))
        mdir = fake_model_dir(tmp, shape)
        if raw["data"].get("proportions") == "from_model":  # a prune-export output carries the final mixture
            save_domain_weights(mdir, {d: 1 / len(domains) for d in domains}, source="test")
        ov.append(f"model.path={mdir}")
    ov.append(f"data.root={fake_data_root(tmp, domains)}")
    return ov


def load_config_raw(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(REPO)) for p in YAMLS])
def test_every_yaml_loads_and_validates(path, tmp_path):
    cfg = load_config(path, overrides_for(path, tmp_path))
    world = 1 if "tiny" in path.parts else 8  # the paper recipes run on 8 GPUs per node
    validate(cfg, world_size=world)


def test_yamls_cover_the_paper_targets():
    names = {p.name for p in YAMLS}
    for n in ("prune_7b_to_2.7b.yaml", "prune_7b_to_1.3b.yaml", "prune_7b_to_370m.yaml", "cpt_2.7b.yaml",
              "cpt_1.3b.yaml", "prune_llama3_8b_to_3b_gqa.yaml"):
        assert n in names
    t = load_config(REPO / "yamls/prune_7b_to_1.3b.yaml").pruning.target
    assert t == {"d_model": 2048, "n_heads": 16, "n_kv_heads": 16, "n_layers": 24, "intermediate_size": 5504}


@pytest.fixture
def good(tmp_path):
    """A valid pruning config (7B yamls with fake paths) and a function to load it with overrides."""
    path = REPO / "yamls/prune_7b_to_2.7b.yaml"
    base = overrides_for(path, tmp_path)

    def load(*extra):
        return load_config(path, base + list(extra))

    return load


@pytest.mark.parametrize("override,key,words", [
    (["data.typo=1"], "data.typo", "not in"),
    (["global_train_batch_size=abc"], "global_train_batch_size", "Integer"),
    (["data.on_exhausted=loop"], "data.on_exhausted", "stop"),  # typed choices: refused when loaded
    (["precision=bf16"], "precision", "amp_bf16"),
])
def test_schema_errors_name_the_key(good, override, key, words):
    with pytest.raises(ConfigError, match=key) as e:
        good(*override)
    assert words in str(e.value)


@pytest.mark.parametrize("override,world,key,words", [
    (["data.proportions=[0.5,0.5,0,0,0,0,0.1]"], 1, "data.proportions", "sum to 1"),
    (["data.proportions=[0.5,0.5]"], 1, "data.proportions", "2 values for 7 domains"),
    (["data.domains=[cc,github,book,stackexchange,wiki,arxiv,c5]"], 1, "data.domains", "c5"),
    (["dynamic_loading.target_losses=[1.0]"], 1, "dynamic_loading.target_losses", "one reference loss per domain"),
    (["global_train_batch_size=30"], 8, "global_train_batch_size", "not divisible by the world size 8"),
    (["device_train_microbatch_size=3"], 1, "device_train_microbatch_size", "does not divide"),
    (["pruning.target.d_model=5000"], 1, "pruning.target", "d_model"),
    (["pruning.target.n_heads=21"], 1, "pruning.target", "n_heads"),
    (["pruning.lagrangian_warmup=9999ba"], 1, "pruning.lagrangian_warmup", "longer than max_duration"),
])
def test_semantic_errors_name_the_key(good, override, world, key, words):
    cfg = good(*override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        validate(cfg, world_size=world)
    assert words in str(e.value)


def test_missing_model_dir_is_explained(tmp_path):
    cfg = load_config(REPO / "yamls/cpt_1.3b.yaml", [f"model.path={tmp_path}/nope",
                                                      f"data.root={fake_data_root(tmp_path, ['cc'])}"])
    with pytest.raises(ConfigError, match="model.path.*convert hf-to-composer"):
        validate(cfg)


def test_required_key_missing(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        load_config(REPO / "yamls/tiny/prune.yaml")


def test_proportions_from_model(tmp_path):
    """`data.proportions: from_model` reads the pruning run's final mixture saved next to the cut model."""
    from llmshearing.training.config import resolve_proportions

    path = REPO / "yamls/cpt_1.3b.yaml"
    ov = overrides_for(path, tmp_path)
    mdir = next(o.split("=", 1)[1] for o in ov if o.startswith("model.path="))
    doms = load_config(path, ov).data.domains
    save_domain_weights(mdir, {d: (i + 1) / 28 for i, d in enumerate(doms)} | {"extra": 0.5}, source="t")
    cfg = load_config(path, ov)
    validate(cfg, world_size=8)
    assert resolve_proportions(cfg) == pytest.approx([(i + 1) / 28 for i in range(7)])  # in data.domains order
    save_domain_weights(mdir, {"cc": 1.0}, source="t")
    with pytest.raises(ConfigError, match=r"data.proportions.*no weight for \['github'"):
        validate(load_config(path, ov), world_size=8)
    (Path(mdir) / "domain_weights.json").unlink()
    with pytest.raises(ConfigError, match="data.proportions.*has no domain_weights.json"):
        validate(load_config(path, ov), world_size=8)
    with pytest.raises(ConfigError, match="data.proportions.*list of numbers or 'from_model'"):
        validate(load_config(path, ov + ["data.proportions=fromodel"]), world_size=8)


def test_data_and_model_must_agree_on_special_tokens(tmp_path):
    """A converted HF model carries its bos/eos ids; data packed with other ids is refused."""
    from _tiny_data import make_tiny_data

    data = make_tiny_data(tmp_path / "tiny")  # packed with the tiny tokenizer: eos 1, BOS 0 added
    shape = ModelShape(64, 4, 4, 16, 2, 96, 1024)

    def model_dir(name, **ids):
        d = tmp_path / name
        d.mkdir()
        (d / "llmshearing.json").write_text(json.dumps(ModelConfig(shape, extra_hf=ids).to_dict()))
        save_file({}, str(d / "model.safetensors"))
        return d

    base = [f"data.root={data}", "model.init=null", "pruning=null", "dynamic_loading=null"]
    ok = model_dir("ok", bos_token_id=0, eos_token_id=[7, 1])
    validate(load_config(REPO / "yamls/tiny/prune.yaml", base + [f"model.path={ok}"]))
    bad_eos = model_dir("bad_eos", bos_token_id=0, eos_token_id=2)
    with pytest.raises(ConfigError, match=r"data.root.*eos_id=1.*eos_token_id=2"):
        validate(load_config(REPO / "yamls/tiny/prune.yaml", base + [f"model.path={bad_eos}"]))
    bad_bos = model_dir("bad_bos", bos_token_id=5, eos_token_id=1)
    with pytest.raises(ConfigError, match=r"data.root.*bos_id=0.*bos_token_id=5"):
        validate(load_config(REPO / "yamls/tiny/prune.yaml", base + [f"model.path={bad_bos}"]))
