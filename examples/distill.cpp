// Distill a float teacher into a 4-bit student with forward KL: the loop of
// examples/distill.c in C++, with every handle owned by a std::unique_ptr
// whose deleter is the matching qkd_*_free, and failures thrown as
// exceptions carrying the context's message. It prints the same lines.
//
// Build against an installed libqkd:
//   c++ -std=c++17 distill.cpp $(pkg-config --cflags --libs libqkd) -o distill-cpp
// Run:
//   ./distill-cpp stories260K.bin tok512.bin tinystories.txt [STEPS]
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <qkd/qkd.h>

namespace {

constexpr int B = 8, T = 64, HELD_OUT = 8;

// A failed library call: its status and "what: STATUS: message".
class qkd_error : public std::runtime_error {
public:
    qkd_error(qkd_status status, const std::string &msg)
        : std::runtime_error(msg), status_(status) {}
    qkd_status status() const noexcept { return status_; }

private:
    qkd_status status_;
};

void check(const qkd_context *ctx, qkd_status st, const std::string &what)
{
    if (st != QKD_OK)
        throw qkd_error(st, what + ": " + qkd_status_name(st) + ": " +
                                (ctx ? qkd_context_last_error(ctx) : ""));
}

// An owning handle: unique_ptr with the library's free function.
template <typename H, void (*Free)(H *)> struct freer {
    void operator()(H *h) const noexcept { Free(h); }
};
template <typename H, void (*Free)(H *)> using owned = std::unique_ptr<H, freer<H, Free>>;

using context = owned<qkd_context, qkd_context_free>;
using model = owned<qkd_model, qkd_model_free>;
using tokenizer = owned<qkd_tokenizer, qkd_tokenizer_free>;
using quantizer = owned<qkd_quantizer, qkd_quantizer_free>;
using loss = owned<qkd_loss, qkd_loss_free>;
using optimizer = owned<qkd_optimizer, qkd_optimizer_free>;
using dataset = owned<qkd_dataset, qkd_dataset_free>;

// Call a creator that writes its handle through an out-pointer and take
// ownership of the result.
template <typename Owned, typename Create>
Owned create(const qkd_context *ctx, const std::string &what, Create &&make)
{
    typename Owned::pointer raw = nullptr;
    check(ctx, make(&raw), what);
    return Owned(raw);
}

context make_context()
{
    return create<context>(nullptr, "context",
                           [](qkd_context **out) { return qkd_context_create(nullptr, out); });
}

model load_model(qkd_context *ctx, const char *path)
{
    return create<model>(ctx, path,
                         [&](qkd_model **out) { return qkd_model_load(ctx, path, out); });
}

// Members are declared in the order they may be freed last-to-first: the
// student borrows the quantizer, the optimizer the student, and every
// handle the context.
class job {
public:
    job(char **argv, int steps)
        : steps_(steps), ctx_(make_context()), teacher_(load_model(ctx_.get(), argv[1])),
          quant_(make_quantizer()), student_(make_student(argv[1])),
          tok_(create<tokenizer>(ctx_.get(), argv[2],
                                 [&](qkd_tokenizer **out) {
                                     return qkd_tokenizer_load(ctx_.get(), argv[2], out);
                                 })),
          loss_(make_loss()), opt_(make_optimizer()),
          data_(create<dataset>(ctx_.get(), argv[3],
                                [&](qkd_dataset **out) {
                                    return qkd_dataset_from_text(ctx_.get(), tok_.get(),
                                                                 argv[3], out);
                                })),
          tokens_(B * T), targets_(B * T)
    {
        check(ctx_.get(), qkd_dataset_set_split(data_.get(), 1, HELD_OUT), "split");
    }

    qkd_model *teacher() const { return teacher_.get(); }
    qkd_model *student() const { return student_.get(); }

    // One step: B windows of T + 1 tokens, both forwards, loss, backward
    // and the optimizer's update.
    void step(int s)
    {
        qkd_context *ctx = ctx_.get();
        float value = 0.0f;
        qkd_step_info info{};
        info.size = sizeof info;
        check(ctx, qkd_dataset_batch(data_.get(), s, B, T, tokens_.data(), targets_.data()),
              "batch");
        check(ctx, qkd_model_forward(teacher_.get(), tokens_.data(), B, T), "teacher forward");
        check(ctx, qkd_model_forward(student_.get(), tokens_.data(), B, T), "student forward");
        check(ctx,
              qkd_loss_compute(loss_.get(), student_.get(), teacher_.get(), targets_.data(),
                               &value),
              "loss");
        check(ctx, qkd_model_zero_grad(student_.get()), "zero grad");
        check(ctx, qkd_model_backward(student_.get(), nullptr), "backward");
        qkd_status st = qkd_optimizer_step(opt_.get(), &info);
        if (!info.skipped) // a skipped step (non-finite) is not fatal
            check(ctx, st, "optimizer step");
        if (s % 10 == 0 || s == steps_ - 1)
            std::printf("step %4d  loss %.4f  lr %.2e  grad norm %.3f\n", s + 1, value,
                        static_cast<double>(info.lr), static_cast<double>(info.grad_norm));
    }

    // Mean cross-entropy on the held-out windows, in nats/token.
    double held_out(qkd_model *m) const
    {
        double ce = 0.0;
        check(ctx_.get(), qkd_distill_eval_ce(ctx_.get(), m, data_.get(), B, T, &ce, nullptr),
              "eval");
        return ce;
    }

private:
    quantizer make_quantizer() const
    {
        qkd_quant_params qp;
        qkd_quant_params_init(&qp);
        qp.scheme = QKD_QUANT_ASYM;
        qp.bits = 4;
        qp.group_size = 32;
        return create<quantizer>(ctx_.get(), "quantizer", [&](qkd_quantizer **out) {
            return qkd_quantizer_create(ctx_.get(), &qp, out);
        });
    }

    // A second copy of the teacher whose linears train on the 4-bit grid.
    model make_student(const char *path) const
    {
        model m = load_model(ctx_.get(), path);
        check(ctx_.get(), qkd_model_set_quantizer(m.get(), quant_.get(), QKD_QUANT_TARGET_LINEAR),
              "student");
        return m;
    }

    loss make_loss() const
    {
        qkd_loss_term term;
        qkd_loss_term_init(&term, QKD_LOSS_FKL);
        loss l = create<loss>(ctx_.get(), "loss",
                              [&](qkd_loss **out) { return qkd_loss_create(ctx_.get(), out); });
        check(ctx_.get(), qkd_loss_add(l.get(), &term), "loss");
        return l;
    }

    optimizer make_optimizer() const
    {
        qkd_optim_params op;
        qkd_optim_params_init(&op);
        op.lr = 5e-4f;
        op.schedule = QKD_SCHEDULE_COSINE;
        op.warmup_steps = steps_ / 10;
        op.total_steps = steps_;
        return create<optimizer>(ctx_.get(), "optimizer", [&](qkd_optimizer **out) {
            return qkd_optimizer_create(student_.get(), &op, out);
        });
    }

    int steps_;
    context ctx_;
    model teacher_;
    quantizer quant_;
    model student_;
    tokenizer tok_;
    loss loss_;
    optimizer opt_;
    dataset data_;
    std::vector<int32_t> tokens_, targets_;
};

} // namespace

int main(int argc, char **argv)
{
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s TEACHER TOKENIZER TEXT [STEPS]\n", argv[0]);
        return 2;
    }
    int steps = argc > 4 ? std::atoi(argv[4]) : 100;
    if (steps < 1)
        return 1;
    try {
        job j(argv, steps);
        double ce_teacher = j.held_out(j.teacher());
        double ce_rtn = j.held_out(j.student());
        for (int s = 0; s < steps; s++)
            j.step(s);
        double ce_student = j.held_out(j.student());
        std::printf("held-out cross-entropy: teacher %.4f, 4-bit round-to-nearest %.4f, "
                    "distilled %.4f\n",
                    ce_teacher, ce_rtn, ce_student);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    return 0;
}
