//! Distill a float teacher into a 4-bit student with forward KL: the loop
//! of examples/distill.c with the safe `qkd` crate. It prints the same
//! lines, to the same digits, as the C example.
//!
//!     cargo run --example distill -- stories260K.bin tok512.bin tinystories.txt [STEPS]

use std::process::ExitCode;

use qkd::{sys, Context, Dataset, Loss, Model, Optimizer, Quantizer, Tokenizer};

const B: usize = 8;
const T: usize = 64;
const HELD_OUT: i64 = 8;

/// printf's "%.2e": two decimals and a signed exponent of at least two digits.
fn c_exp(x: f64) -> String {
    let s = format!("{x:.2e}");
    let (mantissa, exp) = s.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    format!(
        "{mantissa}e{}{:02}",
        if exp < 0 { '-' } else { '+' },
        exp.abs()
    )
}

fn run(args: &[String]) -> qkd::Result<()> {
    let steps: i64 = args.get(4).map_or(100, |s| s.parse().unwrap_or(0));
    let ctx = Context::new()?;
    // Declared before the student, which borrows it.
    let quant = Quantizer::new(&ctx, |p| {
        p.scheme = sys::QKD_QUANT_ASYM;
        p.bits = 4;
        p.group_size = 32;
    })?;
    let teacher = Model::load(&ctx, &args[1])?;
    let mut student = Model::load(&ctx, &args[1])?;
    student.set_quantizer(&quant, sys::QKD_QUANT_TARGET_LINEAR)?;
    let tok = Tokenizer::load(&ctx, &args[2])?;
    let loss = Loss::new(&ctx)?;
    loss.add(sys::QKD_LOSS_FKL, |_| {})?;
    let opt = Optimizer::new(&student, |p| {
        p.lr = 5e-4;
        p.schedule = sys::QKD_SCHEDULE_COSINE;
        p.warmup_steps = steps / 10;
        p.total_steps = steps;
    })?;
    let data = Dataset::from_text(&ctx, &tok, &args[3])?;
    data.set_split(1, HELD_OUT)?;

    let ce_teacher = teacher.eval_ce(&data, B, T)?;
    let ce_rtn = student.eval_ce(&data, B, T)?;
    let (mut tokens, mut targets) = (vec![0; B * T], vec![0; B * T]);
    // One step: B windows of T + 1 tokens, both forwards, loss, backward
    // and the optimizer's update.
    for s in 0..steps {
        data.batch(s, B, T, &mut tokens, &mut targets)?;
        teacher.forward(&tokens, B, T)?;
        student.forward(&tokens, B, T)?;
        let value = loss.compute(&student, Some(&teacher), Some(&targets))?;
        student.zero_grad()?;
        student.backward()?;
        let info = opt.step()?; // a skipped step (non-finite) is not fatal
        if s % 10 == 0 || s == steps - 1 {
            println!(
                "step {:4}  loss {:.4}  lr {}  grad norm {:.3}",
                s + 1,
                value,
                c_exp(f64::from(info.lr)),
                info.grad_norm
            );
        }
    }
    let ce_student = student.eval_ce(&data, B, T)?;
    println!(
        "held-out cross-entropy: teacher {ce_teacher:.4}, 4-bit round-to-nearest {ce_rtn:.4}, \
              distilled {ce_student:.4}"
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: {} TEACHER TOKENIZER TEXT [STEPS]", args[0]);
        return ExitCode::from(2);
    }
    if args
        .get(4)
        .map_or(false, |s| s.parse::<i64>().map_or(true, |n| n < 1))
    {
        return ExitCode::from(1);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}
