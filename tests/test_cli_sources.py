"""`rectdiff pairs -> rectify -> diagnose` on models trained outside rectdiff (issue 16): a
diffusers DDPMPipeline folder whose student stock diffusers samples in one step, and a user's
own network through --model-factory; every bad input is one line and exit code 2."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from rectdiff import adapters, data, metrics, predictions, samplers
from rectdiff.apps.model_sources import open_source
from rectdiff.apps.outside_sources import import_factory
from rectdiff.cli import main
from rectdiff.training import TrainConfig
from rectdiff.training.trainer import train

N_TRAIN = 1400  # digits 0..1399 train the teacher, the other 397 are held out


def tiny_unet() -> UNet2DModel:
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
        norm_num_groups=8, layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    """A DDPMPipeline folder (v-prediction, 1000 steps) trained briefly on digits by rectdiff's
    trainer through adapters.diffusers_unet, then `rectdiff pairs` and `rectdiff rectify`."""
    root = tmp_path_factory.mktemp("ddpm")
    torch.manual_seed(0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    model, form, prediction = adapters.diffusers_unet(tiny_unet(), scheduler)
    x_train = data.digits()[0][:N_TRAIN]
    config = TrainConfig(steps=100, batch_size=32, lr=2e-3)
    train(model, x_train, form=form, prediction=prediction, config=config, progress=False)
    DDPMPipeline(unet=model.unet.eval(), scheduler=scheduler).save_pretrained(root / "teacher")
    teacher, pairs, student = (str(root / name) for name in ("teacher", "pairs", "student"))
    assert main(["pairs", "--model", teacher, "--out", pairs, "--num", "256", "--steps", "8",
                 "--batch-size", "256", "--no-progress"]) == 0  # fmt: skip
    assert main(["rectify", "--model", teacher, "--pairs", pairs, "--out", student, "--steps",
                 "100", "--batch-size", "32", "--no-progress"]) == 0  # fmt: skip
    return SimpleNamespace(root=root, teacher=teacher, pairs=pairs, student=student)


#: samples a student folder and the teacher's unet in stock diffusers, rectdiff unimportable
STOCK_ONE_STEP = r"""
import sys
sys.modules["rectdiff"] = None  # before anything: `import rectdiff` now raises ImportError
import torch
from diffusers import DDPMPipeline, UNet2DModel

student, teacher, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
pipe = DDPMPipeline.from_pretrained(student, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
images = pipe(batch_size=n, generator=torch.Generator().manual_seed(0), num_inference_steps=1,
              output_type="np").images
unet = UNet2DModel.from_pretrained(teacher, subfolder="unet", local_files_only=True)
base = DDPMPipeline(unet=unet, scheduler=pipe.scheduler)  # the same DDIM-trailing scheduler
base.set_progress_bar_config(disable=True)
base_images = base(batch_size=n, generator=torch.Generator().manual_seed(0),
                   num_inference_steps=1, output_type="np").images
noise = torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(0))  # the start
loaded = sorted(k for k, v in sys.modules.items() if k.startswith("rectdiff") and v is not None)
torch.save({"student": torch.from_numpy(images), "teacher": torch.from_numpy(base_images),
            "noise": noise, "rectdiff": loaded}, out)
"""


def test_diffusers_student_is_a_stock_ddpm_pipeline_that_beats_its_teacher_in_one_step(ddpm):
    index = json.loads(open(os.path.join(ddpm.student, "model_index.json")).read())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    config = json.loads(
        open(os.path.join(ddpm.student, "scheduler", "scheduler_config.json")).read()
    )
    assert config["timestep_spacing"] == "trailing" and config["set_alpha_to_one"] is True
    assert config["clip_sample"] is True and config["prediction_type"] == "v_prediction"
    record = json.loads(open(os.path.join(ddpm.student, "rectdiff.json")).read())
    assert record["prediction"] == "v" and record["info"]["pairs"] == ddpm.pairs
    manifest = json.loads(open(os.path.join(ddpm.pairs, "manifest.json")).read())
    assert "unet files sha256" in json.dumps(manifest)

    n, out = 397, os.path.join(ddpm.root, "stock.pt")
    done = subprocess.run(
        [sys.executable, "-c", STOCK_ONE_STEP, ddpm.student, ddpm.teacher, str(n), out],
        env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    stock = torch.load(out)
    assert stock["rectdiff"] == []

    def as_data(images):  # the pipeline's [0, 1] (N, H, W, C) back to rectdiff's [-1, 1]
        return (2.0 * images - 1.0).permute(0, 3, 1, 2).float()

    held_out = data.digits()[0][N_TRAIN:].flatten(1)
    student, teacher = as_data(stock["student"]), as_data(stock["teacher"])
    d_student = metrics.energy_distance(student.flatten(1), held_out)
    d_teacher = metrics.energy_distance(teacher.flatten(1), held_out)
    print(f"\ndiffusers one-step energy distance: teacher {d_teacher:.4f}, student {d_student:.4f}")
    assert d_student < d_teacher

    # rectdiff's own one step of the student: the x0-prediction at timestep 999 from the
    # pipeline's start noise, clipped to [-1, 1] as the scheduler (clip_sample=True) does
    model, form, prediction = open_source(ddpm.student).adapted
    x, t = stock["noise"], torch.ones(n)
    with torch.no_grad():
        out = model(x, form.model_time(t))
    x0 = predictions.convert(out, prediction, "x0", x_t=x, t=t, form=form).clamp(-1.0, 1.0)
    gap = float((x0 - student).abs().max())
    # and `rectdiff diagnose` reads the diffusers student folder
    report = os.path.join(ddpm.root, "diagnose.json")
    assert main(["diagnose", "--model", ddpm.student, "--num", "32", "--steps", "8", "--rtol",
                 "1e-3", "--atol", "1e-3", "--out", report]) == 0  # fmt: skip
    diagnosis = json.loads(open(report).read())[0]
    assert diagnosis["model"] == ddpm.student and diagnosis["prediction"] == "v"
    assert diagnosis["one_step_gap"] >= 0 and "train_coupling_crossing_rate" in diagnosis
    print(f"stock diffusers vs rectdiff one step: max |difference| {gap:.3g}")
    assert gap < 1e-5


NET = '''
import torch
from torch import nn


class Net(nn.Module):
    """A flow-tutorial network: net(x, t) with t = 0 noise and t = 1 data, outputs dx/dt."""

    def __init__(self, hidden={hidden}):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                  nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x, t):
        return self.body(torch.cat([x, t[:, None]], dim=1))


def build():
    return Net()
'''


def flow_tutorial_train(net, x1, steps=1500, seed=0):
    """The tutorials' objective: x_s = s x1 + (1 - s) x0, target x1 - x0 (noise at s = 0)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x1), (256,), generator=gen)
        data_, noise = x1[idx], torch.randn(256, 2, generator=gen)
        s = torch.rand(256, generator=gen)
        x_s = s[:, None] * data_ + (1 - s[:, None]) * noise
        loss = (net(x_s, s) - (data_ - noise)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    """`mynet_cli:build` trained on eight Gaussians, then pairs -> rectify -> diagnose."""
    root = tmp_path_factory.mktemp("factory")
    (root / "mynet_cli.py").write_text(NET.format(hidden=64))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(sys, "path", list(sys.path))
        torch.manual_seed(0)
        build = import_factory("mynet_cli:build")  # imported from the current folder

        net = flow_tutorial_train(build(), data.eight_gaussians(4000, seed=1)[0])
        save_file(net.state_dict(), str(root / "w.safetensors"))
        flags = ["--model-factory", "mynet_cli:build", "--weights", "w.safetensors",
                 "--convention", "flow-tutorial", "--convention-arg", "sigma_min=0.0"]  # fmt: skip
        assert main(["pairs", *flags, "--shape", "2", "--out", "pairs", "--num", "2000",
                     "--steps", "16", "--no-progress"]) == 0  # fmt: skip
        assert main(["rectify", *flags, "--shape", "2", "--pairs", "pairs", "--out", "student",
                     "--steps", "600", "--batch-size", "256", "--no-progress"]) == 0  # fmt: skip
        yield SimpleNamespace(root=root, module=sys.modules["mynet_cli"], flags=flags)


def test_factory_student_is_the_users_state_dict_and_beats_its_teacher(factory):
    root = factory.root
    net = factory.module.build()
    net.load_state_dict(load_file(root / "student" / "model.safetensors"))  # strict keys
    assert set(load_file(root / "student" / "model.safetensors")) == set(net.state_dict())
    record = json.loads((root / "student" / "model.json").read_text())
    assert record["factory"] == "mynet_cli:build" and record["convention"] == "flow-tutorial"
    assert record["convention_args"] == {"sigma_min": 0.0} and record["shape"] == [2]
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7))
    x_test = data.eight_gaussians(2000, seed=9)[0]
    distance = {}
    for name, source in (("teacher", open_source(factory=factory.flags[1],
                                                 weights=root / "w.safetensors",
                                                 convention="flow-tutorial", shape="2")),
                         ("student", open_source(root / "student"))):  # fmt: skip
        model, form, prediction = source.adapted
        with torch.no_grad():
            x = samplers.sample(model, noise, form=form, prediction=prediction, steps=1)
        distance[name] = metrics.energy_distance(x, x_test)
    print(f"\nfactory one-step energy distance: {distance}")
    assert distance["student"] < distance["teacher"]


def test_diagnose_reads_the_factory_student_folder(factory, capsys):
    """`rectdiff diagnose --model student` rebuilds the network from the folder's model.json;
    rectification shrank the one-step gap and the first-order deviation of its teacher."""
    records = {}
    for name, source in (("teacher", [*factory.flags, "--shape", "2"]),
                         ("student", ["--model", "student"])):  # fmt: skip
        capsys.readouterr()
        code = main(["diagnose", *source, "--num", "200", "--steps", "12",
                     "--out", f"diagnose_{name}.json"])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        records[name] = json.loads((factory.root / f"diagnose_{name}.json").read_text())[0]
    student, teacher = records["student"], records["teacher"]
    assert student["model"] == "student" and "train_coupling_crossing_rate" in student
    print(
        f"\none-step gap {teacher['one_step_gap']:.3g} -> {student['one_step_gap']:.3g}, "
        f"first-order deviation {teacher['first_order_deviation']:.3g} -> "
        f"{student['first_order_deviation']:.3g}"
    )
    assert student["one_step_gap"] < 0.5 * teacher["one_step_gap"]
    assert student["first_order_deviation"] < 0.5 * teacher["first_order_deviation"]


def check_refused(argv, value, out, capsys):
    """``main(argv)`` exits 2 with one stderr line naming ``value`` and writes nothing."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and value in err, err
    assert not os.path.exists(out)
    return err


def test_bad_inputs_are_one_line_errors_naming_the_value(factory, capsys):
    root = factory.root
    torch.manual_seed(1)
    full = factory.module.build().state_dict()
    save_file(
        {k: v for k, v in full.items() if k != "body.4.bias"}, str(root / "missing.safetensors")
    )
    small = sys.modules["mynet_cli"].Net(hidden=32).state_dict()
    save_file(small, str(root / "small.safetensors"))
    (root / "neither").mkdir()
    (root / "neither" / "notes.txt").write_text("not a model")
    flags = dict(zip(factory.flags[::2], factory.flags[1::2], strict=True))

    def argv(command="pairs", **changed):
        given = flags | {f"--{k.replace('_', '-')}": v for k, v in changed.items()}
        return [command, *[x for kv in given.items() for x in kv if kv[1] is not None],
                "--shape", "2", "--out", "out", "--num", "10", "--no-progress"]  # fmt: skip

    check_refused(argv(convention="flowtutorial"), "'flowtutorial'", root / "out", capsys)
    check_refused(argv(model_factory="no_such_module_xyz:build"), "no_such_module_xyz",
                  root / "out", capsys)  # fmt: skip
    check_refused(argv(model_factory="mynet_cli:nope"), "'nope'", root / "out", capsys)
    err = check_refused(argv(weights="missing.safetensors"), "missing.safetensors",
                        root / "out", capsys)  # fmt: skip
    assert "missing keys: body.4.bias" in err
    err = check_refused(
        argv(weights="small.safetensors"), "small.safetensors", root / "out", capsys
    )
    assert "body.0.weight (32, 3) vs (64, 3)" in err
    check_refused(argv(convention_arg="call=sideways"), "'sideways'", root / "out", capsys)
    check_refused(["pairs", "--model", "neither", "--out", "out", "--num", "10"], "neither",
                  root / "out", capsys)  # fmt: skip
    no_shape = [x for x in argv() if x not in ("--shape", "2")]
    err = check_refused(no_shape, "mynet_cli:build", root / "out", capsys)
    assert "--shape" in err
    rectify = ["rectify", "--model", "neither", "--pairs", "pairs", "--out", "out2"]
    check_refused(rectify, "neither", root / "out2", capsys)
    (root / "occupied").mkdir()
    err = check_refused(["rectify", "--model", "student", "--pairs", "pairs", "--out", "occupied",
                         "--steps", "1"], "occupied", root / "occupied" / "model.json", capsys)  # fmt: skip
    check_refused(["diagnose", "--model-factory", "mynet_cli:build", "--weights",
                   "w.safetensors", "--convention", "torchcfm", "--convention-arg", "matcher=sb",
                   "--shape", "2", "--out", "d.json"], "'sb'", root / "d.json", capsys)  # fmt: skip
