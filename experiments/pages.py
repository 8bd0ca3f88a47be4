"""Documentation pages from a finished run: ``python -m experiments pages RUN_DIR [--to docs/results]``.

``RUN_DIR`` is the output of ``quick`` (one folder per study; ``results/latest`` names the newest)
or of one study's command. Each study becomes ``<to>/<study>.md``: its title, the command that
made it, the hardware (from the run's ``run.json``), its verdict, its table and its plots, copied
into ``<to>/<study>/``. ``<to>/index.md`` lists every study page in ``<to>`` with its verdict. The
pages link only to files inside ``<to>``, by relative links, so that they build with
``mkdocs build --strict``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional

#: where the pages go by default
DEFAULT_TO = Path("docs/results")
#: a Markdown link or image: ``[text](target)`` / ``![text](target)``
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
#: a table's ``**Verdict.** ...`` paragraph (a page shows the verdict in its own section)
VERDICT_PARAGRAPH = re.compile(r"(?m)^\*\*Verdict\.\*\*.*(?:\n(?!\s*\n).*)*\n*")
NO_VERDICT = "The study wrote no verdict."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``RUN_DIR`` and ``--to``."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a finished run: the --out of quick or of one study")
    parser.add_argument("--to", type=Path, default=DEFAULT_TO, help=f"where the pages go [default: {DEFAULT_TO}]")


def run(args: argparse.Namespace) -> None:
    """Write the pages and list them."""
    for path in write_pages(args.run_dir, args.to):
        print(path)


def resolve_run_dir(path: Path) -> Path:
    """``path``, or the run a ``latest`` text file names (where symlinks were not possible)."""
    return path.parent / path.read_text().strip() if path.is_file() else path


def read_json(path: Path) -> dict:
    """The JSON object in ``path`` (empty when it is missing, unreadable or not an object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_verdict(folder: Path) -> Optional[List[str]]:
    """The sentences of ``folder/verdict.json`` (``{"study": ..., "lines": [...]}``); ``None`` where none."""
    lines = read_json(folder / "verdict.json").get("lines")
    return [str(line) for line in lines] if isinstance(lines, list) and lines else None


def study_folders(run_dir: Path, info: dict) -> Dict[str, Path]:
    """Study name -> folder: the run itself for one study's output, else its folders with a ``table.md``."""
    if (run_dir / "table.md").exists():
        name = (info.get("studies") or [None])[0] or read_json(run_dir / "verdict.json").get("study") or run_dir.name
        return {name: run_dir}
    found = {p.name: p for p in sorted(run_dir.iterdir()) if (p / "table.md").is_file()}
    order = [name for name in info.get("studies", []) if name in found]
    return {name: found[name] for name in order + sorted(set(found) - set(order))}


def hardware_text(info: dict) -> str:
    """``a 16-core CPU and one GPU (NVIDIA H100 80GB HBM3), torch 2.4.0``, from ``run.json``."""
    if "cpu_count" not in info:
        return "hardware not recorded"
    text = f"a {info['cpu_count']}-core CPU"
    if info.get("cuda"):
        text += f" and one GPU ({info.get('gpu') or 'CUDA'})"
    return text + (f", torch {info['torch']}" if info.get("torch") else "")


def made_by(name: str, info: dict) -> str:
    """The sentence that says how the study's results were made."""
    command = info.get("study_commands", {}).get(name)
    if not command:
        return "The run recorded no command or hardware (no run.json)."
    inside = f" (in `{info['command']}`)" if info.get("layout") == "quick" and info.get("command") else ""
    seconds = info.get("seconds", {}).get(name, info.get("wall_seconds") if info.get("layout") == "study" else None)
    took = f"; {seconds:.0f} s" if isinstance(seconds, (int, float)) else ""
    date = str(info.get("date", ""))[:10]
    return f"Made by `{command}`{inside} on {hardware_text(info)}{', ' + date if date else ''}{took}."


def relink(text: str, page_dir: Path) -> str:
    """``text`` with every relative link or image whose target is not in ``page_dir`` turned
    into its plain text (the pages link only to what they hold)."""
    def replace(match: re.Match) -> str:
        target = match.group(3).split("#")[0]
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target) or (page_dir / target).exists():
            return match.group(0)
        return match.group(2)

    return LINK.sub(replace, text)


def study_page(name: str, folder: Path, info: dict, to: Path) -> Path:
    """``to/<name>.md``, its plots copied into ``to/<name>/`` (emptied first: no plot of an older run
    stays) with ``source.json``, what the index reads about the page."""
    table = (folder / "table.md").read_text().splitlines()
    title = table[0][2:].strip() if table and table[0].startswith("# ") else ""
    body = "\n".join(table[1:] if title else table).strip()
    verdict = read_verdict(folder)
    if verdict:
        body = VERDICT_PARAGRAPH.sub("", body, count=1).strip()
    shutil.rmtree(to / name, ignore_errors=True)
    (to / name).mkdir(parents=True)
    plots = sorted({p for pattern in ("*.png", "*.svg") for p in folder.glob(pattern)})
    for plot in plots:
        shutil.copy2(plot, to / name / plot.name)
    source = {"study": name, "title": title or name, "verdict": verdict, "made_by": made_by(name, info)}
    lines = [f"# {source['title']}", "", source["made_by"], "", "## Verdict", "",
             " ".join(verdict) if verdict else NO_VERDICT, "", "## Results", "", body, ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({name}/{p.name})\n" for p in plots]
    (to / f"{name}.md").write_text(relink("\n".join(lines), to))
    (to / name / "source.json").write_text(json.dumps(source, indent=1))
    return to / f"{name}.md"


def index_page(to: Path) -> Path:
    """``to/index.md``: every study page in ``to``, with its verdict and how it was made."""
    lines = ["# Results", "",
             "One page per study, made from a finished run by the `pages` command of `python -m experiments`: "
             "the command and hardware, the verdict, the table and the plots.", ""]
    for source_file in sorted(to.glob("*/source.json")):
        source, name = read_json(source_file), source_file.parent.name
        if (to / f"{name}.md").is_file():
            verdict = source.get("verdict")
            lines += [f"## [{source.get('title') or name}]({name}.md)", "",
                      " ".join(verdict) if verdict else NO_VERDICT, "", str(source.get("made_by", "")), ""]
    (to / "index.md").write_text("\n".join(lines))
    return to / "index.md"


def write_pages(run_dir: Path, to: Path) -> List[Path]:
    """One page per study of ``run_dir`` and the index; returns their paths."""
    run_dir = resolve_run_dir(run_dir)
    if not run_dir.is_dir():
        raise SystemExit(f"pages: {run_dir} is not a directory")
    info = read_json(run_dir / "run.json")
    folders = study_folders(run_dir, info)
    if not folders:
        raise SystemExit(f"pages: {run_dir} holds no study results (no table.md)")
    to.mkdir(parents=True, exist_ok=True)
    return [study_page(name, folder, info, to) for name, folder in folders.items()] + [index_page(to)]
