"""The built book, page by page, as a reader meets it.

Every page of ``_toc.yml`` is checked in ``_build/html`` twice:

* statically, from the HTML alone (always runs): no MathJax from a CDN and the local MathJax
  script exists, no LaTeX left outside math, no Markdown table left as pipes in a paragraph, no
  traceback / warning / stderr block in the cell outputs, no absolute path of the build machine,
  every ``<img>`` is a file that decodes, every relative link resolves and no file name became a
  web link (MyST's linkify turns ``METHOD.md`` into ``http://METHOD.md``);
* in headless Chromium (marked slow): the DOM after JavaScript ran, where MathJax must have
  typeset every formula, plus a screenshot of each page in ``_build/screenshots/<page>.png`` for a
  human to look at.

The checks take a build folder, so the last tests run them on a copy with injected defects.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from PIL import Image

from cmpagl.paths import REPO_ROOT

bs4 = pytest.importorskip("bs4", reason="beautifulsoup4 comes with jupyter-book (.[book] extra)")

BUILD = REPO_ROOT / "_build" / "html"
BUILD_COMMAND = (
    "make book  (with executed/ current: "
    ".venv/bin/jupyter-book build . --builder html -W --keep-going)"
)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=8000",
)
SCREENSHOT_SIZE = (1300, 3000)  # wide as a laptop screen, tall enough for a page's first part
PAGE_TIMEOUT_S = 60
QUOTE_CHARS = 120

#: What never shows in prose: code, scripts, and math (checked on its own).
CODE_SELECTORS = "script, style, noscript, template, pre, code, textarea, .highlight"
MATH_SELECTORS = ".math, mjx-container"
BLOCK_TAGS = (
    "p div section article aside nav header footer li ul ol dl dt dd table tr td th "
    "h1 h2 h3 h4 h5 h6 blockquote figure figcaption pre br hr details summary"
).split()

RAW_LATEX = re.compile(r"\\\[|\\\(|\$\$|\\begin\{|\$[^$\s][^$\n]*\\[A-Za-z]+[^$\n]*\$")
PIPE_ROW = re.compile(r"^[ \t]*\|(?:[^|\n]*\|){2,}[ \t]*$", re.MULTILINE)
PIPE_RULE = re.compile(r"\|\s*:?-{3,}:?\s*\|")
LINKIFIED_FILE = re.compile(r"[\w-]+\.(md|py|ipynb|ya?ml|json|txt|csv|toml|sh|pt|bib)", re.I)
OUTPUT_NOISE = re.compile(r"Traceback|\w*Warning\b|IProgress|warnings\.warn")


def machine_paths(build: Path) -> list[str]:
    """Strings that reveal the build machine in a page: the checkout's absolute path, home and
    temp folders, an installed package's path."""
    repo = str(build.resolve().parents[1])
    needles = {str(REPO_ROOT), repo, "/root/", "/home/", "/tmp/", "site-packages"}
    return sorted(needles, key=len, reverse=True)  # the longest first, in one alternation


def toc_pages(repo_root: Path = REPO_ROOT) -> list[str]:
    """The pages of ``_toc.yml``, in order, as paths without suffix (``book/intro``)."""
    toc = yaml.safe_load((repo_root / "_toc.yml").read_text(encoding="utf-8"))
    pages: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key in ("root", "file"):
                if key in node:
                    pages.append(re.sub(r"\.(md|ipynb|rst)$", "", str(node[key])))
            for value in node.values():
                if isinstance(value, list | dict):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return list(dict.fromkeys(pages))


PAGES = toc_pages()


def quote(text: str, start: int) -> str:
    """The line of ``text`` around ``start``, whitespace collapsed, at most QUOTE_CHARS long."""
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", start)
    line = text[line_start : line_end if line_end >= 0 else len(text)]
    offset = start - line_start
    window = line if offset < QUOTE_CHARS - 20 else "…" + line[offset - 40 :]
    return repr(" ".join(window.split())[:QUOTE_CHARS])


def findings(pattern: re.Pattern[str], text: str) -> list[tuple[str, int]]:
    """The lines of ``text`` where ``pattern`` matches: (the distinct matches, joined; where the
    first starts), so that one output line is one problem however many patterns it trips."""
    lines: dict[int, list[re.Match[str]]] = {}
    for match in pattern.finditer(text):
        lines.setdefault(text.count("\n", 0, match.start()), []).append(match)
    return [
        (", ".join(dict.fromkeys(m.group() for m in matches)), matches[0].start())
        for matches in lines.values()
    ]


def text_of(soup: bs4.BeautifulSoup, drop: str) -> str:
    """The text of ``soup``'s body without the elements ``drop`` selects, one line per block
    element (so that a paragraph of Markdown table rows stays one row per line)."""
    body = copy.copy(soup.body or soup)
    for tag in body.select(drop):
        tag.replace_with(" ")
    for tag in body.find_all(BLOCK_TAGS):
        tag.insert_before("\n")
        tag.append("\n")
    return body.get_text("")


def image_problem(page_file: Path, src: str) -> str | None:
    """Why an ``<img src>`` would not show offline, or None."""
    if not src:
        return "an <img> without src"
    if src.startswith("data:"):
        return None
    parts = urlsplit(src)
    if parts.scheme or parts.netloc:
        return f"image loaded from the network: {src[:QUOTE_CHARS]!r}"
    path = (page_file.parent / unquote(parts.path)).resolve()
    if not path.is_file() or path.stat().st_size == 0:
        return f"image file missing: {src!r} (looked for {path.name})"
    if path.suffix.lower() == ".svg":
        if b"<svg" not in path.read_bytes()[:4096]:
            return f"image is not an SVG: {src!r}"
        return None
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as err:  # noqa: BLE001 - any decoding error is the finding
        return f"image does not decode: {src!r} ({err})"
    return None


def link_problem(page_file: Path, href: str) -> str | None:
    """Why a link goes nowhere, or None: a relative link to a missing file, or a file name that
    MyST's linkify made into a web address (``METHOD.md`` -> ``http://METHOD.md``)."""
    parts = urlsplit(href)
    if parts.scheme in ("http", "https"):
        if LINKIFIED_FILE.fullmatch(parts.netloc) and parts.path in ("", "/"):
            return "file name made into a web link (linkify)"
        return None
    if parts.scheme or not parts.path:  # mailto:, javascript:, #anchor
        return None
    if not (page_file.parent / unquote(parts.path)).exists():
        return "broken link"
    return None


def content_problems(build: Path, page: str, soup: bs4.BeautifulSoup) -> list[str]:
    """What a reader would see wrong in ``soup`` (the built page or its DOM after JavaScript)."""
    page_file = build / f"{page}.html"
    problems: list[str] = []

    for script in soup.find_all("script", src=True):
        src = script["src"]
        if "mathjax" in src.lower() and (urlsplit(src).scheme or src.startswith("//")):
            problems.append(f"MathJax loaded from a CDN, not _static/mathjax: {src!r}")

    prose = text_of(soup, f"{CODE_SELECTORS}, {MATH_SELECTORS}")
    for match in RAW_LATEX.finditer(prose):
        problems.append(f"LaTeX outside math (not typeset): {quote(prose, match.start())}")
    for match in [*PIPE_ROW.finditer(prose), *PIPE_RULE.finditer(prose)]:
        problems.append(f"Markdown table left as text: {quote(prose, match.start())}")

    for block in soup.select(".stderr, .traceback"):
        kind = "stderr" if "stderr" in block["class"] else "error"
        text = block.get_text(" ")
        problems.append(f"{kind} output block: {quote(text, len(text) - len(text.lstrip()))}")
    for block in soup.select(".cell_output, div.output"):
        text = block.get_text("")
        for found, start in findings(OUTPUT_NOISE, text):
            problems.append(f"{found} in a cell output: {quote(text, start)}")

    visible = text_of(soup, "script, style, noscript, template")
    paths = re.compile("|".join(map(re.escape, machine_paths(build))))
    for found, start in findings(paths, visible):
        problems.append(f"path of the build machine ({found}): {quote(visible, start)}")

    for img in soup.find_all("img"):
        problem = image_problem(page_file, img.get("src", ""))
        if problem:
            problems.append(problem)
    for link in soup.find_all("a", href=True):
        problem = link_problem(page_file, link["href"])
        if problem:
            problems.append(
                f"{problem}: {link['href'][:QUOTE_CHARS]!r} ({quote(link.get_text(), 0)})"
            )
    return list(dict.fromkeys(problems))


def static_problems(build: Path, page: str) -> list[str]:
    """Problems of one built page that its HTML alone shows."""
    page_file = build / f"{page}.html"
    if not page_file.is_file():
        return [f"{page_file} was not built (stale build? rebuild: {BUILD_COMMAND})"]
    soup = bs4.BeautifulSoup(page_file.read_text(encoding="utf-8"), "html.parser")
    problems = content_problems(build, page, soup)
    local_mathjax = []
    for script in soup.find_all("script", src=True):
        src = script["src"]
        if "mathjax" in src.lower() and not urlsplit(src).scheme and not src.startswith("//"):
            path = (page_file.parent / unquote(urlsplit(src).path)).resolve()
            local_mathjax.append(path)
            if not path.is_file():
                problems.append(f"MathJax script missing: {src!r} (rebuild: {BUILD_COMMAND})")
    if soup.select(".math") and not local_mathjax:
        problems.append("page has math but loads no MathJax from _static/mathjax")
    return problems


@dataclass
class Rendered:
    """One page as Chromium rendered it: its DOM after JavaScript and its screenshot."""

    dom: str
    screenshot: Path
    error: str | None = None


def find_chromium() -> str | None:
    return next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)


def render(chromium: str, page_file: Path, screenshot: Path, profile: Path) -> Rendered:
    """Load ``page_file`` in headless Chromium: dump the DOM after scripts ran, screenshot it."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    cmd = [
        chromium,
        *CHROMIUM_FLAGS,
        "--window-size={},{}".format(*SCREENSHOT_SIZE),
        f"--user-data-dir={profile}",
        f"--screenshot={screenshot}",
        "--dump-dom",
        page_file.resolve().as_uri(),
    ]
    # Own process group, so that a timeout ends Chromium's renderer processes too.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=PAGE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return Rendered("", screenshot, f"Chromium did not finish in {PAGE_TIMEOUT_S} s")
    if proc.returncode != 0 or "<html" not in out:
        tail = " | ".join(err.strip().splitlines()[-3:])
        return Rendered(out, screenshot, f"Chromium failed (exit {proc.returncode}): {tail}")
    return Rendered(out, screenshot)


def render_pages(
    chromium: str, build: Path, pages: list[str], screenshots: Path, profiles: Path
) -> dict[str, Rendered]:
    """Render ``pages`` of ``build`` two at a time (the machine has 2 cores)."""

    def one(index_page: tuple[int, str]) -> Rendered:
        index, page = index_page
        shot = screenshots / f"{page}.png"
        return render(chromium, build / f"{page}.html", shot, profiles / f"profile{index}")

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(pages, pool.map(one, enumerate(pages)), strict=True))


def rendered_problems(build: Path, page: str, rendered: Rendered) -> list[str]:
    """Problems of one page in the DOM after JavaScript: the content checks, MathJax typeset
    every formula without error, and the screenshot was written."""
    if not (build / f"{page}.html").is_file():
        return static_problems(build, page)  # not built: says so and how to build it
    if rendered.error:
        return [rendered.error]
    soup = bs4.BeautifulSoup(rendered.dom, "html.parser")
    problems = content_problems(build, page, soup)
    # The n-th `.math` of the DOM is the n-th of the built HTML, which still holds the TeX.
    built = bs4.BeautifulSoup((build / f"{page}.html").read_text(encoding="utf-8"), "html.parser")
    sources = [m.get_text() for m in built.select(".math")]
    for index, math in enumerate(soup.select(".math")):
        tex = quote(sources[index] if index < len(sources) else math.get_text(), 0)
        if not math.find("mjx-container"):
            problems.append(f"MathJax did not typeset: {tex}")
        for error in math.find_all("mjx-merror"):
            message = error.get("data-mjx-error") or error.get_text(" ")
            problems.append(f"MathJax error {message[:QUOTE_CHARS]!r} in {tex}")
    for error in soup.find_all("mjx-merror"):
        if not error.find_parent(class_="math"):
            message = error.get("data-mjx-error") or error.get_text(" ")
            problems.append(f"MathJax error {message[:QUOTE_CHARS]!r}")
    if not rendered.screenshot.is_file():
        problems.append(f"no screenshot written to {rendered.screenshot}")
    else:
        with Image.open(rendered.screenshot) as img:
            if img.size != SCREENSHOT_SIZE:
                problems.append(f"screenshot is {img.size}, not {SCREENSHOT_SIZE} px")
    return problems


def report(page: str, problems: list[str]) -> str:
    return f"{page}: {len(problems)} problem(s)\n  " + "\n  ".join(problems)


@pytest.fixture(scope="session")
def built_book() -> Path:
    if not (BUILD / "index.html").is_file():
        pytest.skip(
            f"the book is not built ({BUILD / 'index.html'} missing); build it: {BUILD_COMMAND}"
        )
    return BUILD


@pytest.fixture(scope="session")
def chromium() -> str:
    found = find_chromium()
    if not found:
        pytest.skip(f"no headless browser: none of {', '.join(CHROMIUM_NAMES)} is on PATH")
    return found


@pytest.fixture(scope="session")
def rendered_book(built_book, chromium, tmp_path_factory) -> dict[str, Rendered]:
    screenshots = built_book.parent / "screenshots"
    return render_pages(chromium, built_book, PAGES, screenshots, tmp_path_factory.mktemp("chrome"))


def test_toc_lists_the_pages():
    assert "book/intro" in PAGES and len(PAGES) > 5, PAGES


@pytest.mark.parametrize("page", PAGES)
def test_built_page_static(built_book, page):
    problems = static_problems(built_book, page)
    if problems:
        pytest.fail(report(page, problems), pytrace=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_page_in_browser(rendered_book, built_book, page):
    problems = rendered_problems(built_book, page, rendered_book[page])
    if problems:
        pytest.fail(report(page, problems), pytrace=False)


BROKEN_HTML = """<!DOCTYPE html><html><head>
<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js"></script></head><body>
<p>Fine prose with <span class="math">\\(x\\)</span> and <code>\\[ code \\]</code>.</p>
<p>Left raw: \\[ x^2 \\] and $\\lambda$.</p>
<p>| config | <code>seed</code> |
|---|---|
| a | 1 |</p>
<div class="cell_output"><div class="output stderr"><pre>/work/x.py:21: TqdmWarning: IProgress
not found</pre></div></div>
<div class="cell_output"><div class="output traceback"><pre>Traceback (most recent call last)
</pre></div></div>
<p>Saved to /home/someone/run. See <a href="http://METHOD.md">METHOD.md</a>,
<a href="other.html#x">other</a>, <a href="#top">top</a>, <a href="https://arxiv.org/">arXiv</a>.</p>
<img src="../_images/missing.png"><img src="http://example.org/a.png">
</body></html>"""


def good_html(image: str) -> str:
    return (
        '<html><head><script src="../_static/mathjax/tex-chtml.js"></script></head><body>'
        '<p>Prose, <span class="math">\\(x\\)</span>, a pipe | in text.</p>'
        "<table><tr><td>a</td><td>b</td></tr></table>"
        '<a href="#x">x</a><a href="good.html">self</a><a href="https://arxiv.org/abs/1">arXiv</a>'
        '<div class="cell_output"><div class="output stream"><pre>mR 25.4 | done\n</pre></div>'
        f'</div><img src="{image}"><pre>$$ code may hold \\[ this \\]</pre></body></html>'
    )


def test_static_checks_catch_a_broken_page(tmp_path):
    build = tmp_path / "_build" / "html"
    (build / "book").mkdir(parents=True)
    (build / "_static" / "mathjax").mkdir(parents=True)
    (build / "_static" / "mathjax" / "tex-chtml.js").write_text("// MathJax\n")
    (build / "_images").mkdir()
    Image.new("RGB", (4, 4)).save(build / "_images" / "ok.png")
    (build / "book" / "good.html").write_text(good_html("../_images/ok.png"))
    (build / "book" / "broken.html").write_text(BROKEN_HTML)

    assert static_problems(build, "book/good") == []
    found = "\n".join(static_problems(build, "book/broken"))
    for expected in (
        "MathJax loaded from a CDN",
        "LaTeX outside math (not typeset): 'Left raw: \\\\[ x^2",
        "Markdown table left as text: '| config | |'",
        "Markdown table left as text: '|---|---|'",
        "stderr output block: '/work/x.py:21: TqdmWarning",
        "TqdmWarning, IProgress in a cell output: '/work/x.py:21: TqdmWarning: IProgress'",
        "Traceback in a cell output",
        "error output block",
        "path of the build machine (/home/): 'Saved to /home/someone/run. See METHOD.md,'",
        "image file missing: '../_images/missing.png'",
        "image loaded from the network: 'http://example.org/a.png'",
        "page has math but loads no MathJax",
        "file name made into a web link (linkify): 'http://METHOD.md' ('METHOD.md')",
        "broken link: 'other.html#x' ('other')",
    ):
        assert expected in found, f"{expected!r} not reported; got:\n{found}"
    assert "not built" in static_problems(build, "book/absent")[0]


@pytest.mark.slow
def test_browser_checks_catch_a_broken_page(built_book, chromium, tmp_path):
    """A built page with math that passes, in a copy of the build: the copy passes, and a copy
    with raw LaTeX, a pipe table and two formulas MathJax cannot typeset fails."""
    page = next(
        (
            p
            for p in PAGES
            if 'class="math' in (built_book / f"{p}.html").read_text(encoding="utf-8")
            and not static_problems(built_book, p)
        ),
        None,
    )
    if page is None:
        pytest.skip("no built page both has math and passes the static checks")
    # A copy of the build: its folders, with a link for each file but the two pages.
    build = tmp_path / "html"
    shutil.copytree(built_book, build, copy_function=os.symlink)
    (build / f"{page}.html").unlink()
    html = (built_book / f"{page}.html").read_text(encoding="utf-8")
    # Inside the article's first section, which MathJax ignores except for `.math` elements.
    heading_end = html.index("</h1>", html.index('class="bd-article"')) + len("</h1>")
    injected = (
        r'<p>Raw: \[ x^2 \]</p><p>| a | b |</p><span class="math">\(\frac{1}{\)</span>'
        r'<span class="math">\(x^^2\)</span>'
    )
    good, broken = page, f"{page}_broken"
    (build / f"{good}.html").write_text(html, encoding="utf-8")
    (build / f"{broken}.html").write_text(
        html[:heading_end] + injected + html[heading_end:], encoding="utf-8"
    )
    rendered = render_pages(chromium, build, [good, broken], tmp_path / "shots", tmp_path)

    assert rendered_problems(build, good, rendered[good]) == []
    found = "\n".join(rendered_problems(build, broken, rendered[broken]))
    for expected in (
        "LaTeX outside math (not typeset): 'Raw: \\\\[ x^2 \\\\]'",
        "Markdown table left as text: '| a | b |'",
        "MathJax did not typeset: '\\\\(\\\\frac{1}{\\\\)'",
        r"MathJax error 'Missing open brace for superscript' in '\\(x^^2\\)'",
    ):
        assert expected in found, f"{expected!r} not reported; got:\n{found}"
