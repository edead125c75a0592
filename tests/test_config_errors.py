"""Config values that used to bypass the schema (issue 13, defect 6 and 7): each is a ConfigError
naming the key, raised by load_config before any data is read."""
import pytest

from ltfast.train.config import ConfigError, load_config


def test_exponent_floats_are_floats():
    # YAML 1.1 (PyYAML) read 1e-3 as the string '1e-3', which the schema then rejected.
    assert load_config(None, ["optim.lr=1e-3"])["optim"]["lr"] == 1e-3
    assert load_config(None, ["optim.weight_decay=5E-4"])["optim"]["weight_decay"] == 5e-4


def test_exponent_floats_in_a_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  weight_decay: 2e-4\n")
    cfg = load_config(str(path))
    assert (cfg["optim"]["lr"], cfg["optim"]["weight_decay"]) == (1e-3, 2e-4)


@pytest.mark.parametrize("override, key", [
    ("train.seed=-1", "train.seed"),
    ("train.seed=4294967296", "train.seed"),
    ("train.threads=-3", "train.threads"),
    ("train.threads=0", "train.threads"),
    ("train.device=tpu", "train.device"),
    ("train.resume=atuo", "train.resume"),
    ("optim.lr=[1", "optim.lr"),
    ("data.mean=[0.5, 0.5]", "data.mean"),
    ("data.std=[0.5, 0.5, 0.5]", "data.std"),            # fmnist_lt is grey: one channel
    ("data.std=[0.0]", "data.std"),
    ("loss.gamma=2", "loss.gamma"),
])
def test_bad_values_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.")):
        load_config(None, [override])


def test_resume_typo_suggests_auto():
    with pytest.raises(ConfigError, match="did you mean 'auto'"):
        load_config(None, ["train.resume=atuo"])


def test_list_mean_and_std_lengths_must_agree():
    lists = ["data.dataset=list", "data.train_list=a.txt", "data.test_list=b.txt"]
    with pytest.raises(ConfigError, match=r"^data\.std: 1 entries but data\.mean has 3"):
        load_config(None, lists + ["data.mean=[0.4, 0.4, 0.4]", "data.std=[0.2]"])
    with pytest.raises(ConfigError, match=r"^data\.mean / data\.std"):
        load_config(None, lists + ["data.mean=[0.4]"])
    load_config(None, lists + ["data.mean=[0.4]", "data.std=[0.2]"])


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML \(line \d+"):
        load_config(str(path))


def test_focal_and_seql_have_their_own_gamma():
    # loss.gamma (0.9, SEQL's drop probability) used to be focal's exponent as well.
    cfg = load_config(None, ["loss.name=focal"])
    assert cfg["loss"]["focal_gamma"] == 2.0
    with pytest.raises(ConfigError, match=r"^loss\.gamma: is SEQL's drop probability; .*loss\.focal_gamma"):
        load_config(None, ["loss.name=focal", "loss.gamma=0.5"])
    with pytest.raises(ConfigError, match=r"^loss\.focal_gamma: only used by loss\.name=focal"):
        load_config(None, ["loss.name=seql", "loss.focal_gamma=3"])
