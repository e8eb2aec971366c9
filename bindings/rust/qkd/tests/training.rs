//! A real distillation step on stories260K compared with examples/distill.c
//! (QKD_DISTILL_EXAMPLE names its binary; QKD_SHARED the shared data, by
//! default ../shared beside the repository), the backend choice, and misuse
//! returning errors.

use std::env;
use std::path::PathBuf;
use std::process::Command;

use qkd::{sys, Context, Dataset, Loss, Model, Optimizer, Quantizer, Tokenizer};

fn shared() -> PathBuf {
    env::var_os("QKD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../../shared"))
}

/// stories260K's model, tokenizer and text, or None (skip) without them.
fn stories() -> Option<[String; 3]> {
    let s = shared();
    let model = s.join("models/stories260K/stories260K.bin");
    if !model.exists() {
        eprintln!("skipped: no {}", model.display());
        return None;
    }
    Some(
        [
            model,
            s.join("models/stories260K/tok512.bin"),
            s.join("text/tinystories/TinyStories-valid.slice_My-AI_Tasks.txt"),
        ]
        .map(|p| p.to_string_lossy().into_owned()),
    )
}

fn output(program: &PathBuf, args: &[String]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .expect("cannot run the example");
    assert!(
        out.status.success(),
        "{}: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The C example's output for `steps` steps, or None (skip) without it.
fn c_example(files: &[String; 3], steps: &str) -> Option<String> {
    let exe = env::var_os("QKD_DISTILL_EXAMPLE");
    if exe.is_none() {
        eprintln!("skipped: QKD_DISTILL_EXAMPLE (examples/distill.c's binary) is not set");
    }
    let exe = exe?;
    let mut args = files.to_vec();
    args.push(steps.into());
    Some(output(&PathBuf::from(exe), &args))
}

#[test]
fn rust_example_prints_what_the_c_example_prints() {
    let (files, expected) = match stories().and_then(|f| c_example(&f, "12").map(|c| (f, c))) {
        Some(found) => found,
        None => return,
    };
    assert_eq!(expected.lines().count(), 4, "{expected}");
    // cargo test builds the examples beside the test binaries' folder.
    let exe = env::current_exe().unwrap();
    let example = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/distill");
    let mut args = files.to_vec();
    args.push("12".into());
    assert_eq!(output(&example, &args), expected);
}

#[test]
fn one_training_step_gives_the_c_example_loss() {
    let (files, expected) = match stories().and_then(|f| c_example(&f, "1").map(|c| (f, c))) {
        Some(found) => found,
        None => return,
    };
    let ctx = Context::new().unwrap();
    let q = Quantizer::new(&ctx, |p| p.group_size = 32).unwrap();
    let teacher = Model::load(&ctx, &files[0]).unwrap();
    let mut student = Model::load(&ctx, &files[0]).unwrap();
    student
        .set_quantizer(&q, sys::QKD_QUANT_TARGET_LINEAR)
        .unwrap();
    let loss = Loss::new(&ctx).unwrap();
    loss.add(sys::QKD_LOSS_FKL, |_| {}).unwrap();
    let opt = Optimizer::new(&student, |p| {
        p.lr = 5e-4;
        p.schedule = sys::QKD_SCHEDULE_COSINE;
        p.total_steps = 10;
    })
    .unwrap();
    let tok = Tokenizer::load(&ctx, &files[1]).unwrap();
    assert_eq!(tok.vocab_size(), 512);
    let data = Dataset::from_text(&ctx, &tok, &files[2]).unwrap();
    data.set_split(1, 8).unwrap();

    let (mut tokens, mut targets) = (vec![0; 8 * 64], vec![0; 8 * 64]);
    data.batch(0, 8, 64, &mut tokens, &mut targets).unwrap();
    teacher.forward(&tokens, 8, 64).unwrap();
    student.forward(&tokens, 8, 64).unwrap();
    let value = loss
        .compute(&student, Some(&teacher), Some(&targets))
        .unwrap();
    loss.compute_deferred(&student, Some(&teacher), Some(&targets))
        .unwrap();
    assert_eq!(loss.value().unwrap(), value);
    // the logits computed by the loss, 100 rows at a time: the same value
    for model in [&teacher, &student] {
        model.set_logits_rows(100).unwrap();
        model.forward(&tokens, 8, 64).unwrap();
    }
    let by_block = loss
        .compute(&student, Some(&teacher), Some(&targets))
        .unwrap();
    assert_eq!(by_block, value);
    student.zero_grad().unwrap();
    student.backward().unwrap();
    let q_index = student.tensor_index("blk.0.attn_q.weight").unwrap();
    let before = student.tensor(q_index).unwrap();
    assert!(student.grad(q_index).unwrap().iter().any(|g| *g != 0.0));
    let info = opt.step().unwrap();
    assert_eq!((info.step, info.skipped), (1, false));
    let after_one = student.tensor(q_index).unwrap();
    opt.step_deferred().unwrap();
    assert_eq!(opt.last_step().unwrap().step, 2);
    assert_ne!(student.tensor(q_index).unwrap(), after_one);
    assert_ne!(student.tensor(q_index).unwrap(), before);
    assert!(
        expected.starts_with(&format!("step    1  loss {value:.4}  ")),
        "{expected}"
    );
}

#[test]
fn backend_is_the_one_asked_for() {
    let reference = Context::with_backend(1, sys::QKD_BACKEND_REF).unwrap();
    assert_eq!(reference.backend(), "ref");
    assert_ne!(Context::new().unwrap().backend(), "cuda"); // AUTO stays on the CPU
    // CUDA: the GPU where this libqkd has the backend and a device, else refused
    match Context::with_backend(1, sys::QKD_BACKEND_CUDA) {
        Ok(gpu) => assert_eq!(gpu.backend(), "cuda"),
        Err(e) => assert_eq!(e.status(), sys::QKD_ERR_UNSUPPORTED),
    }
    let e = Context::with_backend(1, 99).err().unwrap();
    assert_eq!(e.status(), sys::QKD_ERR_INVALID_ARG);
}

#[test]
fn misuse_returns_errors() {
    let files = match stories() {
        Some(files) => files,
        None => return,
    };
    let ctx = Context::with_threads(1).unwrap();
    assert_eq!(ctx.n_threads(), 1);

    let e = Model::load(&ctx, "/nonexistent/model.bin").err().unwrap();
    assert_eq!(e.status(), sys::QKD_ERR_IO);
    assert!(e.to_string().starts_with("QKD_ERR_IO: ") && e.message().contains("/nonexistent"));
    assert_eq!(
        Model::load(&ctx, "a\0b").err().unwrap().status(),
        sys::QKD_ERR_INVALID_ARG
    );
    let e = Quantizer::new(&ctx, |p| p.bits = 5).err().unwrap();
    assert_eq!(e.status(), sys::QKD_ERR_INVALID_ARG);

    let model = Model::load(&ctx, &files[0]).unwrap();
    assert_eq!(model.logits().unwrap_err().status(), sys::QKD_ERR_STATE);
    assert_eq!(
        model.forward(&[1, 2, 3], 2, 2).unwrap_err().status(),
        sys::QKD_ERR_SHAPE
    );
    assert_eq!(
        model.forward(&[1, 512], 1, 2).unwrap_err().status(),
        sys::QKD_ERR_RANGE
    );
    model.forward(&[1, 2, 3, 4], 2, 2).unwrap();
    assert_eq!(model.logits().unwrap().len(), 4 * 512);
    assert_eq!(
        model.logits_into(&mut [0.0; 7]).unwrap_err().status(),
        sys::QKD_ERR_SHAPE
    );
    assert_eq!(
        model.cross_entropy(&[1, 2]).unwrap_err().status(),
        sys::QKD_ERR_SHAPE
    );
    assert_eq!(
        model.set_tensor(0, &[0.0; 3]).unwrap_err().status(),
        sys::QKD_ERR_SHAPE
    );
    assert_eq!(model.tensor(999).unwrap_err().status(), sys::QKD_ERR_RANGE);
    assert_eq!(
        model.tensor_index("no.such").unwrap_err().status(),
        sys::QKD_ERR_NOT_FOUND
    );
    let config = model.config().unwrap();
    assert_eq!((config.dim, config.vocab_size), (64, 512));
    assert!(qkd::version().starts_with("0."));
}

#[test]
fn frozen_model_gives_the_same_logits_and_no_gradients() {
    let files = match stories() {
        Some(files) => files,
        None => return,
    };
    let ctx = Context::with_threads(1).unwrap();
    let trained = Model::load(&ctx, &files[0]).unwrap();
    let frozen = Model::load(&ctx, &files[0]).unwrap();
    frozen.set_trainable(false).unwrap();
    let tokens: Vec<i32> = (0..32).collect();
    trained.forward(&tokens, 2, 16).unwrap();
    frozen.forward(&tokens, 2, 16).unwrap();
    assert_eq!(frozen.logits().unwrap(), trained.logits().unwrap());
    assert_eq!(
        frozen.cross_entropy(&tokens).unwrap_err().status(),
        sys::QKD_ERR_STATE
    );
    assert_eq!(frozen.backward().unwrap_err().status(), sys::QKD_ERR_STATE);
    // no gradient buffers at all
    assert_eq!(frozen.grad(1).unwrap_err().status(), sys::QKD_ERR_STATE);
    frozen.set_matmul_precision(sys::QKD_MATMUL_BF16).unwrap();
    frozen.forward(&tokens, 2, 16).unwrap();
    assert_ne!(frozen.logits().unwrap(), trained.logits().unwrap());
    assert_eq!(
        frozen.set_matmul_precision(7).unwrap_err().status(),
        sys::QKD_ERR_INVALID_ARG
    );
}
