import json

import pytest

from config import DEFAULT_CONFIG, Config, ConfigError, from_dict, load_config, parse_override, save_config
from conftest import ROOT


def test_default_config_file_loads_and_has_every_key():
    cfg = load_config()
    file_keys = set(json.load(open(DEFAULT_CONFIG)))
    assert file_keys == set(Config().to_dict()), "configs.json must list every config key"
    assert cfg.embed_dim == 384 and cfg.seq_len == 10 and cfg.chunk_size == 10


def test_reference_configs_json_loads_unchanged(tmp_path):
    """GR1-Training's configs.json (its 57 keys, reference values) is accepted as it is."""
    reference = {
        "evaluate_during_training": True, "record_evaluation_video": False, "compile_model": False,
        "bytedance_ckpt_path": "./snapshot_ABC.pt", "load_bytedance_ckpt": False, "load_epoch": 0, "save_epochs": 1,
        "num_epochs": 20, "num_sequences": 1000, "ep_len": 360, "print_steps": 100, "lr_max": 0.0009,
        "weight_decay": 0.0001, "arm_loss_ratio": 100, "num_warmup_epochs": 1, "bs_per_gpu": 19,
        "workers_per_gpu": 7, "prefetch_factor": 2, "gradient_accumulation_steps": 3, "rgb_static_pad": 10,
        "rgb_gripper_pad": 4, "rgb_shape": 224, "patch_size": 16, "rgb_mean": [0.485, 0.456, 0.406],
        "rgb_std": [0.229, 0.224, 0.225], "LMDB_path": "../calvin_lmdb/", "save_path": "./Save/",
        "mae_ckpt": "./mae_pretrain_vit_base.pth", "embed_dim": 384, "n_layer": 12, "n_head": 12,
        "activation_function": "relu", "dropout": 0.1, "n_positions": 1024, "device": "cuda",
        "resampler_depth": 3, "resampler_dim_head": 128, "resampler_heads": 4, "resampler_num_media_embeds": 1,
        "resampler_num_latents": 9, "seq_len": 10, "chunk_size": 10, "test_chunk_size": 1, "skip_frame": 3,
        "action_mode": "ee_rel_pose", "act_dim": 7, "state_dim": 7, "use_hand_rgb": True,
        "clip_backbone": "ViT-B/32", "act_pred": True, "fwd_pred": True, "fwd_pred_hand": True,
        "fwd_pred_next_n": 3, "without_norm_pixel_loss": False, "img_feat_dim": 768, "patch_feat_dim": 768,
        "lang_feat_dim": 512}
    assert len(reference) == 57
    path = tmp_path / "configs.json"
    path.write_text(json.dumps(reference))
    cfg = load_config(str(path))
    assert cfg.arm_loss_ratio == 100.0 and isinstance(cfg.arm_loss_ratio, float)
    assert cfg.rgb_mean == (0.485, 0.456, 0.406)


def test_misspelt_key_names_the_closest_valid_key(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"bs_per_gpus": 4}))
    with pytest.raises(ConfigError, match="did you mean 'bs_per_gpu'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="did you mean 'LMDB_path'"):
        load_config(None, ["lmdb_path=/data"])
    with pytest.raises(ConfigError, match="unknown config key 'zzz'"):
        from_dict({"zzz": 1})


def test_wrong_types_and_values_are_rejected():
    with pytest.raises(ConfigError, match="'bs_per_gpu' must be an integer"):
        from_dict({"bs_per_gpu": "8"})
    with pytest.raises(ConfigError, match="'compile_model' must be true or false"):
        from_dict({"compile_model": 1})
    with pytest.raises(ConfigError, match="'action_mode' must be one of"):
        from_dict({"action_mode": "joint"})
    with pytest.raises(ConfigError, match="'test_chunk_size'"):
        from_dict({"test_chunk_size": 11})
    with pytest.raises(ConfigError, match="'bs_per_gpu' must be > 0"):
        from_dict({"bs_per_gpu": 0})
    with pytest.raises(ConfigError, match="not supported"):
        from_dict({"fwd_pred": False})


def test_overrides_parse_json_and_keep_strings_verbatim():
    assert parse_override("bs_per_gpu=8") == ("bs_per_gpu", 8)
    assert parse_override("lr_max=1e-4") == ("lr_max", 1e-4)
    assert parse_override("compile_model=true") == ("compile_model", True)
    assert parse_override("rgb_mean=[0.5,0.5,0.5]") == ("rgb_mean", [0.5, 0.5, 0.5])
    assert parse_override("save_path=./runs/1e-3/") == ("save_path", "./runs/1e-3/")
    cfg = load_config(None, ["bs_per_gpu=8", "save_path=/tmp/x", "resume=true"])
    assert (cfg.bs_per_gpu, cfg.save_path, cfg.resume) == (8, "/tmp/x", True)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("bs_per_gpu")


def test_round_trip_through_saved_file(tmp_path):
    cfg = load_config(None, ["seq_len=5", "skip_frame=2"])
    save_config(cfg, str(tmp_path / "cfg.json"))
    assert load_config(str(tmp_path / "cfg.json")) == cfg
    assert cfg.replace(bs_per_gpu=3).bs_per_gpu == 3


def test_every_config_file_in_the_repository_is_valid():
    import glob
    import os
    for path in [DEFAULT_CONFIG] + glob.glob(os.path.join(ROOT, "configs", "*.json")):
        load_config(path)
