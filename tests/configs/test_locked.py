"""Every config file returns a locked config: a misspelt field raises, existing fields change."""

import pytest

from configs import decoder_lm, eva02, pixelllm, sam, t5


@pytest.mark.parametrize("get_config,arg", [
    (pixelllm.get_config, "tiny"), (sam.get_config, "tiny"), (eva02.get_config, "tiny"),
    (t5.get_config, "tiny"), (decoder_lm.get_config, "tiny_llama"),
])
def test_new_keys_are_refused(get_config, arg):
    config = get_config(arg)
    with pytest.raises(AttributeError, match="cannot be added since the config is locked"):
        config.model.not_a_field = 1
    with pytest.raises(AttributeError, match="cannot be added since the config is locked"):
        config.sharding.mesh_shap = (1, 1, 1)


def test_pixelllm_typo_raises_and_suggests_the_field():
    config = pixelllm.get_config("tiny")
    with pytest.raises(AttributeError, match='Did you mean "mask_dice"'):
        config.loss.mask_dise = 5.0
    config.loss.mask_dice = 5.0
    assert config.loss.mask_dice == 5.0


def test_pixelllm_has_the_paper_scale_switches():
    config = pixelllm.get_config("t5_xl")
    assert config.model.dtype == "float32"
    assert config.model.remat == "none"
    assert config.model.eva02.scan_layers is False


def _parse(argv):
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_command_line_overrides_still_apply():
    config = _parse(["prog", "--config=configs/pixelllm.py:tiny", "--config.loss.mask_dice=3.5",
                     "--config.model.dtype=bfloat16"])
    assert config.loss.mask_dice == 3.5
    assert config.model.dtype == "bfloat16"
    with pytest.raises(AttributeError, match="Did you mean \"mask_dice\""):
        _parse(["prog", "--config=configs/pixelllm.py:tiny", "--config.loss.mask_dise=3.5"])
