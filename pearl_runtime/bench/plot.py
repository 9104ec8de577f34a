"""`pearl bench --plot FILE.png`: tokens/s and speedup over ar against batch size, one line per
mode. matplotlib is an optional extra (`pip install 'pearl-serve[plot]'`), imported only here."""

MISSING = "--plot needs matplotlib: pip install 'pearl-serve[plot]' (or pip install matplotlib)"


def check() -> None:
    """Fail in one line, before a run, when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(MISSING) from None


def draw(rows: list[dict], path: str, title: str = "") -> str:
    """Two panels over batch size (log 2): tokens/s and speedup over ar, a line per mode. Returns `path`."""
    check()
    import matplotlib
    matplotlib.use("Agg")   # files only: no display on a bench machine
    import matplotlib.pyplot as plt
    from pearl_runtime.bench.report import ORDER

    fig, (rate, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in [m for m in ORDER if any(r["mode"] == m for r in rows)]:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["batch_size"])
        bs = [r["batch_size"] for r in mine]
        rate.plot(bs, [r["tokens_per_s"] for r in mine], marker="o", label=mode)
        ups = [(r["batch_size"], r["speedup_vs_ar"]) for r in mine if r.get("speedup_vs_ar")]
        if ups:
            speed.plot(*zip(*ups), marker="o", label=mode)
    for ax, what in ((rate, "tokens/s"), (speed, "speedup over ar (wall clock)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
        ax.legend()
    speed.axhline(1.0, color="grey", linewidth=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
