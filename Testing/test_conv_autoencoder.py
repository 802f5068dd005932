"""The torch-only autoencoder against MONAI's AutoEncoder (num_res_units=0): same parameter names, same function."""

import subprocess
import sys

import pytest
import torch
from monai.networks.nets import AutoEncoder

from BrainAnomalyLib.nets import build_net
from BrainAnomalyLib.nets.conv_autoencoder import ConvAutoEncoder

CONFIGS = [("PRELU", "BATCH", [16, 32, 64, 8], [2, 2, 2, 1]), ("RELU", "INSTANCE", [8, 16], [2, 2]),
           ("LEAKYRELU", "BATCH", [8, 8], [1, 2]), ("ELU", "INSTANCE", [4, 8], [2, 1]),
           ("GELU", "BATCH", [4, 8], [2, 2]), ("SWISH", "BATCH", [4, 8], [2, 2])]


@pytest.mark.parametrize("act,norm,channels,strides", CONFIGS)
def test_same_parameters_and_outputs_as_monai(act, norm, channels, strides):
    torch.manual_seed(0)
    theirs = AutoEncoder(spatial_dims=2, in_channels=2, out_channels=2, channels=channels, strides=strides,
                         num_res_units=0, act=act, norm=norm)
    for module in theirs.modules():  # batch statistics and affine terms away from their initial values
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    ours = ConvAutoEncoder(2, 2, channels, strides, act, norm)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 2, 48, 32)
    for train in (False, True):
        theirs.train(train)
        ours.train(train)
        with torch.no_grad():
            expected, got = theirs(x), ours(x)
        assert got.shape == x.shape
        # SiLU against MONAI's own swish differs by float rounding; every other layer is the same arithmetic
        assert torch.allclose(got, expected, rtol=0, atol=1e-5 if act == "SWISH" else 0.0)


def test_residual_units_still_build_monai_s_autoencoder():
    net = build_net({"type": "ae_spatial", "size": [32, 32], "channels": [4, 8], "strides": [2, 2],
                     "num_res_units": 1})
    assert isinstance(net.body, AutoEncoder)
    assert isinstance(build_net({"type": "ae_spatial", "size": [32, 32], "channels": [4, 8],
                                 "strides": [2, 2]}).body, ConvAutoEncoder)


def test_the_default_model_scores_without_importing_monai():
    code = ("import sys\nfrom BrainAnomalyLib.store.models import resolve_model, default_model_name\n"
            "from BrainAnomalyLib.detection.pipeline import Detector\n"
            "Detector(resolve_model(default_model_name()), device='cpu').prepare()\n"
            "print(sorted(m for m in sys.modules if m == 'monai' or m.startswith('monai.')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
