"""`qroar-figures FOLDER`: the dashboard's diagnostics charts, drawn from a folder `qroar diagnose` wrote.

The engine's CLI writes numbers (JSON + CSV) and never imports the dashboard; the charts are the
dashboard's (app.diag_charts, Plotly), so this command ships with the dashboard's packages.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def write_figures(folder, kind: str = "html", out=None) -> list[Path]:
    """Write every diagnostics chart of `folder` as HTML (self-contained, works offline) and/or PNG."""
    from app.diag_charts import figures
    from qroar.diagnostics import DiagResult

    res = DiagResult.read(folder)
    out = Path(out or folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures(res.tables, res.settings.get("trained_context")).items():
        if kind in ("html", "both"):
            paths.append(out / f"{name}.html")
            fig.write_html(paths[-1], include_plotlyjs=True)
        if kind in ("png", "both"):
            paths.append(out / f"{name}.png")
            fig.write_image(paths[-1], width=1100, height=fig.layout.height or 500)
    return paths


def main(argv=None) -> int:
    from qroar.errors import QroarError

    p = argparse.ArgumentParser(prog="qroar-figures", description="Draw the charts of a `qroar diagnose` folder.")
    p.add_argument("folder", help="the --out folder of `qroar diagnose` (holds diagnostics.json)")
    p.add_argument("--format", default="html", choices=("html", "png", "both"), help="png needs kaleido and Chromium")
    p.add_argument("--out", default=None, help="where to write (default: the folder itself)")
    a = p.parse_args(argv)
    try:
        paths = write_figures(a.folder, a.format, a.out)
    except QroarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # kaleido/Chromium failures come in many types; say what to do instead of a traceback
        if a.format == "html":
            raise
        print(f"error: PNG export failed ({type(e).__name__}: {e}); use --format html, or install Chromium.", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} figures to {a.out or a.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
