"""Misuse raises, never crashes: closed handles, wrong dtypes and shapes,
bad paths and parameters; and the loader's checks."""
import gc
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import qkd
from qkd import _lib
from conftest import SOURCE


def test_each_status_has_its_exception():
    classes = qkd.QkdError.__subclasses__()
    assert len(classes) == 13
    for cls in classes:
        name = _lib.lib.qkd_status_name(cls.status).decode()
        words = name[len("QKD_ERR_"):].split("_")
        assert cls.__name__ == "".join(w.capitalize() for w in words) + "Error", name


def test_bad_path_raises_with_the_library_message(ctx, tmp_path):
    logged = []
    with qkd.Context(log=lambda level, msg: logged.append((level, msg))) as c:
        with pytest.raises(qkd.IoError) as e:
            qkd.Model.load(c, tmp_path / "missing.bin")
        assert "missing.bin" in str(e.value) and e.value.status == qkd.IoError.status
        assert logged == [(0, e.value.message)]  # errors reach the log callback
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(qkd.QkdError):
        qkd.Model.load(ctx, bad)
    with pytest.raises(qkd.IoError):
        qkd.Tokenizer.load(ctx, tmp_path / "missing.tok")


def test_bad_parameters_raise(ctx):
    with pytest.raises(qkd.InvalidArgError):
        qkd.Quantizer(ctx, bits=5)
    with pytest.raises(TypeError):
        qkd.Quantizer(ctx, bitz=4)
    with pytest.raises(ValueError):
        qkd.Quantizer(ctx, scheme="q9_9")
    with pytest.raises(ValueError):
        qkd.Loss(ctx, "kl")
    with pytest.raises(qkd.InvalidArgError):
        qkd.Model.create(ctx, dim=63)


def test_wrong_dtype_or_shape_raises_before_calling_c(ctx, stories):
    model = qkd.Model.load(ctx, stories[0])
    with pytest.raises(qkd.StateError):
        model.logits()  # no forward yet
    for tokens in (np.zeros((2, 8), np.int64), np.zeros((2, 8), np.float32),
                   np.zeros(8, np.int32), [[1, 2, 3]], np.zeros((8, 4), np.int32).T):
        with pytest.raises(ValueError):
            model.forward(tokens)
    model.forward(np.ones((2, 8), np.int32))
    for out in (np.zeros((2, 8, 511), np.float32), np.zeros((2, 8, 512), np.float64),
                np.zeros((2, 8, 512), np.float32)[:, :, ::-1]):
        with pytest.raises(ValueError):
            model.logits(out=out)
    frozen = np.zeros((2, 8, 512), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError):
        model.logits(out=frozen)
    with pytest.raises(ValueError):
        model.cross_entropy(np.zeros((2, 7), np.int32))
    with pytest.raises(ValueError):
        model.backward(np.zeros((2, 8, 512), np.float64))
    with pytest.raises(ValueError):
        model.set(0, np.zeros((512, 63), np.float32))
    with pytest.raises(qkd.RangeError):
        model.forward(np.full((1, 4), 512, np.int32))  # a token outside the vocabulary
    with pytest.raises(qkd.NotFoundError):
        model.get("no.such.tensor")


def test_closed_handles_raise(ctx, stories):
    model = qkd.Model.load(ctx, stories[0])
    q = qkd.Quantizer(ctx)
    model.set_quantizer(q)
    opt = qkd.Optimizer(model)
    model.close()
    assert model.closed and opt.closed  # the optimizer borrowed the model
    with pytest.raises(qkd.ClosedError):
        model.forward(np.ones((1, 4), np.int32))
    with pytest.raises(qkd.ClosedError):
        opt.step()
    with pytest.raises(ValueError):  # ClosedError is a ValueError too, as for files
        model.n_params
    model.close()  # closing twice is fine
    with pytest.raises(qkd.ClosedError):
        with model:
            pass
    student = qkd.Model.load(ctx, stories[0])
    student.set_quantizer(q)
    q.close()  # the student borrowed the quantizer
    assert student.closed


def test_backend_is_the_one_asked_for():
    assert qkd.Context(n_threads=1, backend="ref").backend == "ref"
    assert qkd.Context(n_threads=1).backend != "cuda"  # auto stays on the CPU
    try:  # the GPU where this libqkd has the backend and a device
        assert qkd.Context(n_threads=1, backend="cuda").backend == "cuda"
    except qkd.UnsupportedError:
        pass
    with pytest.raises(ValueError):
        qkd.Context(backend="gpu")


def test_closing_the_context_closes_everything(stories):
    ctx = qkd.Context(n_threads=1)
    assert ctx.n_threads == 1 and ctx.backend in ("ref", "simd", "cuda")
    model = qkd.Model.load(ctx, stories[0])
    tok = qkd.Tokenizer.load(ctx, stories[1])
    data = qkd.Dataset.from_tokens(ctx, np.arange(100, dtype=np.int32), 512)
    ctx.close()
    for handle in (model, tok, data):
        assert handle.closed
    with pytest.raises(qkd.ClosedError):
        tok.encode("x")
    with pytest.raises(qkd.ClosedError):
        ctx.last_error


def test_dropped_owners_stay_alive_for_their_borrowers(stories):
    model = qkd.Model.load(qkd.Context(), stories[0])
    student = qkd.Model.load(model._ctx, stories[0])
    student.set_quantizer(qkd.Quantizer(model._ctx))
    gc.collect()
    student.forward(np.ones((1, 4), np.int32))  # context and quantizer still alive
    assert student.logits().shape == (1, 4, 512)


def test_collection_in_any_order_is_safe(stories):
    """Handles in one reference cycle are finalized in arbitrary order."""
    for _ in range(3):
        ctx = qkd.Context()
        model = qkd.Model.load(ctx, stories[0])
        data = qkd.Dataset.from_tokens(ctx, np.arange(400, dtype=np.int32) % 512, 512)
        run = qkd.Distill(ctx, None, model, qkd.Loss(ctx, "ce"), qkd.Optimizer(model), data,
                          batch=1, seq=8, total_steps=1, on_step=lambda stats: False)
        assert run.run()
        run.cycle = (run, ctx, model, data)
        del ctx, model, data, run
        gc.collect()


def run_import(env):
    env = dict(os.environ, PYTHONPATH=os.path.join(SOURCE, "bindings", "python"), **env)
    return subprocess.run([sys.executable, "-c", "import qkd; print(qkd.library_path)"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


def test_loader_honours_qkd_lib_path():
    folder = os.path.dirname(qkd.library_path)
    out = run_import({"QKD_LIB_PATH": folder})
    assert out.returncode == 0 and out.stdout.strip() == os.path.join(folder, _lib.SONAME)
    out = run_import({"QKD_LIB_PATH": "/nonexistent/libqkd.so.0"})
    assert out.returncode != 0 and "LibraryNotFound" in out.stderr
    assert "/nonexistent/libqkd.so.0 (QKD_LIB_PATH)" in out.stderr


def test_loader_refuses_another_major_version(tmp_path):
    cc = shutil.which("cc")
    if not cc:
        pytest.skip("no C compiler")
    src = tmp_path / "fake.c"
    src.write_text('unsigned qkd_version(void) { return 10203; }\n'
                   'const char *qkd_version_string(void) { return "1.2.3"; }\n')
    lib = tmp_path / _lib.SONAME
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    out = run_import({"QKD_LIB_PATH": str(tmp_path)})
    assert out.returncode != 0 and "LibraryVersionError" in out.stderr
    assert "libqkd 1.2.3 (major 1); this binding needs major 0" in out.stderr


STRUCTS = {"qkd_context_params": _lib.ContextParams, "qkd_model_config": _lib.ModelConfig,
           "qkd_tensor_info": _lib.TensorInfo, "qkd_gguf_params": _lib.GgufParams,
           "qkd_safetensors_params": _lib.SafetensorsParams,
           "qkd_quant_params": _lib.QuantParams, "qkd_loss_term": _lib.LossTerm,
           "qkd_optim_params": _lib.OptimParams, "qkd_step_info": _lib.StepInfo,
           "qkd_distill_stats": _lib.DistillStats, "qkd_distill_params": _lib.DistillParams}


def test_structures_mirror_the_c_layouts(tmp_path):
    """Size and every field's offset, as the C compiler lays them out."""
    cc = shutil.which("cc")
    if not cc:
        pytest.skip("no C compiler")
    lines, expected = [], []
    for name, struct in STRUCTS.items():
        lines.append('printf("%%zu\\n", sizeof(%s));' % name)
        expected.append(_lib.ctypes.sizeof(struct))
        for field, _ in struct._fields_:
            lines.append('printf("%%zu\\n", offsetof(%s, %s));' % (name, field))
            expected.append(getattr(struct, field).offset)
    src = tmp_path / "layout.c"
    src.write_text("#include <stddef.h>\n#include <stdio.h>\n#include <qkd/qkd.h>\n"
                   "int main(void) {\n%s\nreturn 0;\n}\n" % "\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run([cc, "-I", os.path.join(SOURCE, "include"), str(src), "-o", str(exe)],
                   check=True)
    out = subprocess.run([str(exe)], stdout=subprocess.PIPE, check=True).stdout.split()
    assert [int(v) for v in out] == expected
