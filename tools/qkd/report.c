/* qkd report METRICS.jsonl --out FILE.svg: the loss curves of a distill
 * run as a self-contained SVG (axes, ticks, labels, legend) that any
 * browser opens. Every numeric key of the lines that starts with "loss"
 * ("loss", and "loss_<term>" for a sum of objectives) is one curve over
 * "step". */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

enum { MAX_SERIES = 8, MAX_POINTS = 4000 };

typedef struct series {
    char name[64];
    double *x, *y;
    size_t n, cap;
} series;

typedef struct plot {
    series s[MAX_SERIES];
    int n_series;
    double x0, x1, y0, y1; /* data ranges */
} plot;

/* ---- reading ----------------------------------------------------------------- */

static series *find_series(plot *pl, const char *name)
{
    for (int i = 0; i < pl->n_series; i++)
        if (!strcmp(pl->s[i].name, name))
            return &pl->s[i];
    if (pl->n_series == MAX_SERIES)
        return NULL;
    series *s = &pl->s[pl->n_series++];
    snprintf(s->name, sizeof s->name, "%s", name);
    return s;
}

static int add_point(series *s, double x, double y)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 256;
        double *nx = realloc(s->x, cap * sizeof *nx);
        if (nx)
            s->x = nx;
        double *ny = nx ? realloc(s->y, cap * sizeof *ny) : NULL;
        if (!ny)
            return -1;
        s->y = ny;
        s->cap = cap;
    }
    s->x[s->n] = x;
    s->y[s->n] = y;
    s->n++;
    return 0;
}

/* The "loss*" numbers of one JSON line. */
static int add_line(plot *pl, json_t *obj)
{
    json_t *step = json_object_get(obj, "step");
    if (!json_is_number(step))
        return 0;
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v) {
        if (strncmp(key, "loss", 4) != 0 || !json_is_number(v))
            continue;
        series *s = find_series(pl, key);
        double y = json_number_value(v);
        if (s && isfinite(y) && add_point(s, json_number_value(step), y) != 0)
            return -1;
    }
    return 0;
}

static int read_metrics(const char *path, plot *pl)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "qkd: %s: cannot open\n", path);
        return CLI_EXIT_FAIL;
    }
    char line[8192];
    int lineno = 0, bad = 0, rc = CLI_EXIT_OK;
    while (rc == CLI_EXIT_OK && fgets(line, sizeof line, f)) {
        lineno++;
        json_t *obj = json_loads(line, 0, NULL);
        if (!json_is_object(obj))
            bad++;
        else if (add_line(pl, obj) != 0)
            rc = cli_fail(NULL, QKD_ERR_NO_MEMORY, path);
        json_decref(obj);
    }
    fclose(f);
    if (bad)
        fprintf(stderr, "qkd: %s: skipped %d of %d lines that are not JSON objects\n", path, bad,
                lineno);
    return rc;
}

/* ---- scales ------------------------------------------------------------------- */

/* A "nice" tick spacing (1, 2 or 5 times a power of ten) giving at most
 * about six ticks over range. */
static double tick_step(double range)
{
    double raw = range / 6.0, mag = pow(10.0, floor(log10(raw)));
    double f = raw / mag;
    return (f <= 1.0 ? 1.0 : f <= 2.0 ? 2.0 : f <= 5.0 ? 5.0 : 10.0) * mag;
}

static int find_ranges(plot *pl)
{
    pl->x0 = pl->y0 = INFINITY;
    pl->x1 = pl->y1 = -INFINITY;
    size_t points = 0;
    for (int i = 0; i < pl->n_series; i++) {
        const series *s = &pl->s[i];
        for (size_t k = 0; k < s->n; k++) {
            pl->x0 = fmin(pl->x0, s->x[k]);
            pl->x1 = fmax(pl->x1, s->x[k]);
            pl->y0 = fmin(pl->y0, s->y[k]);
            pl->y1 = fmax(pl->y1, s->y[k]);
        }
        points += s->n;
    }
    if (points == 0)
        return -1;
    /* A flat or single-point curve still gets a visible range. */
    if (pl->x1 - pl->x0 < 1.0)
        pl->x1 = pl->x0 + 1.0;
    double pad = (pl->y1 - pl->y0) * 0.05;
    if (pad <= 0.0)
        pad = fabs(pl->y0) * 0.05 + 0.05;
    pl->y0 -= pad;
    pl->y1 += pad;
    return 0;
}

/* ---- SVG ------------------------------------------------------------------------ */

enum { W = 820, H = 500, LEFT = 80, RIGHT = 180, TOP = 50, BOTTOM = 60 };
static const double plot_w = W - LEFT - RIGHT, plot_h = H - TOP - BOTTOM;
static const char *const colors[MAX_SERIES] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e",
                                               "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};

static double px(const plot *pl, double x)
{
    return LEFT + (x - pl->x0) / (pl->x1 - pl->x0) * plot_w;
}

static double py(const plot *pl, double y)
{
    return TOP + (pl->y1 - y) / (pl->y1 - pl->y0) * plot_h;
}

/* Text with &, < and > escaped for XML. */
static void put_text(FILE *f, const char *s)
{
    for (; *s; s++) {
        if (*s == '&')
            fputs("&amp;", f);
        else if (*s == '<')
            fputs("&lt;", f);
        else if (*s == '>')
            fputs("&gt;", f);
        else
            fputc(*s, f);
    }
}

static void draw_axes(FILE *f, const plot *pl)
{
    fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" "
               "stroke=\"#333\"/>\n", LEFT, TOP, plot_w, plot_h);
    double dx = tick_step(pl->x1 - pl->x0), dy = tick_step(pl->y1 - pl->y0);
    for (double x = ceil(pl->x0 / dx) * dx; x <= pl->x1 + 1e-9 * dx; x += dx) {
        double X = px(pl, x);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%.0f\" stroke=\"#ddd\"/>\n", X,
                TOP, X, TOP + plot_h);
        fprintf(f, "<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%g</text>\n", X,
                TOP + plot_h + 18, x);
    }
    for (double y = ceil(pl->y0 / dy) * dy; y <= pl->y1 + 1e-9 * dy; y += dy) {
        double Y = py(pl, y);
        fprintf(f, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%.0f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n",
                LEFT, Y, LEFT + plot_w, Y);
        fprintf(f, "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n", LEFT - 6,
                Y + 4, fabs(y) < 1e-12 * dy ? 0.0 : y);
    }
    fprintf(f, "<text x=\"%.0f\" y=\"%d\" text-anchor=\"middle\">step</text>\n",
            LEFT + plot_w / 2, H - 15);
    fprintf(f, "<text x=\"20\" y=\"%.0f\" text-anchor=\"middle\" transform=\"rotate(-90 20 "
               "%.0f)\">loss (nats/token)</text>\n", TOP + plot_h / 2, TOP + plot_h / 2);
}

static void draw_series(FILE *f, const plot *pl, int i)
{
    const series *s = &pl->s[i];
    size_t stride = s->n > MAX_POINTS ? (s->n + MAX_POINTS - 1) / MAX_POINTS : 1;
    fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"",
            colors[i]);
    for (size_t k = 0; k < s->n; k += stride)
        fprintf(f, "%.1f,%.1f ", px(pl, s->x[k]), py(pl, s->y[k]));
    fprintf(f, "%.1f,%.1f\"/>\n", px(pl, s->x[s->n - 1]), py(pl, s->y[s->n - 1]));
    double ly = TOP + 20 + 22 * i, lx = LEFT + plot_w + 16;
    fprintf(f, "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" stroke=\"%s\" "
               "stroke-width=\"3\"/>\n", lx, ly, lx + 24, ly, colors[i]);
    fprintf(f, "<text x=\"%.0f\" y=\"%.0f\">", lx + 30, ly + 4);
    put_text(f, s->name);
    fputs("</text>\n", f);
}

static int write_svg(const char *path, const plot *pl, const char *title)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "qkd: %s: cannot create\n", path);
        return CLI_EXIT_FAIL;
    }
    fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
               "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
               "viewBox=\"0 0 %d %d\" font-family=\"sans-serif\" font-size=\"12\">\n"
               "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, H, W, H);
    fprintf(f, "<text x=\"%.0f\" y=\"28\" text-anchor=\"middle\" font-size=\"15\">",
            LEFT + plot_w / 2);
    put_text(f, title);
    fputs("</text>\n", f);
    draw_axes(f, pl);
    for (int i = 0; i < pl->n_series; i++)
        if (pl->s[i].n > 0)
            draw_series(f, pl, i);
    fputs("</svg>\n", f);
    if (fclose(f) != 0) {
        fprintf(stderr, "qkd: %s: write error\n", path);
        return CLI_EXIT_FAIL;
    }
    return CLI_EXIT_OK;
}

static int report_main(int argc, char **argv)
{
    const char *out = NULL, *title = NULL;
    const cli_option opts[] = {
        {"--out", "-o", CLI_STRING, &out, NULL},
        {"--title", NULL, CLI_STRING, &title, NULL},
    };
    cli_common c;
    int rc = cli_parse(&cli_cmd_report, argc, argv, opts, sizeof opts / sizeof opts[0], &c);
    if (rc != CLI_CONTINUE)
        return rc;
    if (!out)
        return cli_usage_error(&cli_cmd_report, "missing --out FILE.svg");
    plot pl = {0};
    rc = read_metrics(c.model, &pl);
    if (rc == CLI_EXIT_OK && find_ranges(&pl) != 0) {
        fprintf(stderr, "qkd: %s: no line has a \"step\" and a finite \"loss\"\n", c.model);
        rc = CLI_EXIT_FAIL;
    }
    if (rc == CLI_EXIT_OK)
        rc = write_svg(out, &pl, title ? title : c.model);
    for (int i = 0; i < pl.n_series; i++) {
        free(pl.s[i].x);
        free(pl.s[i].y);
    }
    return rc;
}

const cli_command cli_cmd_report = {
    .name = "report",
    .summary = "draw the loss curves of a metrics.jsonl as an SVG",
    .usage = "METRICS.jsonl --out FILE.svg [--title TEXT]",
    .help = "  -o, --out FILE   the SVG to write\n"
            "  --title TEXT     the picture's title (default: the metrics path)\n",
    .run = report_main,
};
