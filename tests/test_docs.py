"""The documentation site builds with --strict (no broken link, reference or notebook cell), and the tutorial
notebook is executed in that build, so what the site shows is what the code does now."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def site(tmp_path_factory, mnist_root) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "LIFELONG_DATA_DIR": str(mnist_root), "NO_MKDOCS_2_WARNING": "1"}
    for key in ("LIFELONG_DOCS_EXECUTE", "MPLBACKEND"):  # always executed; figures by Jupyter's inline backend
        env.pop(key, None)
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


@pytest.mark.integration
def test_the_tutorial_is_executed_and_rendered_with_its_outputs(site):
    html = (site / "tutorials" / "ewc_from_equations_to_code" / "index.html").read_text()
    text = re.sub(r"<[^>]+>", "", html)
    assert "gradient: lifelong's equals autograd's for every parameter" in text
    assert "penalty: merged" in text and "two quadratics" in text
    acc = {m: float(a) for m, a in re.findall(r"(fine-tuning|EWC)\s+average accuracy ([\d.]+) %", text)}
    assert acc.keys() == {"fine-tuning", "EWC"} and acc["EWC"] > acc["fine-tuning"]
    assert html.count("data:image/png;base64") >= 2  # the Fisher scatter and the accuracy curves


@pytest.mark.integration
def test_every_page_and_the_api_reference_are_built(site):
    for page in ("getting-started", "streams", "methods", "experiments", "running", "performance", "extending"):
        assert (site / page / "index.html").is_file()
    api = (site / "api" / "methods" / "index.html").read_text()
    assert "fisher_sums" in api and "QuadraticRegularizer" in api  # rendered from the docstrings


RAW_ROLES = re.compile(r":(math|class|func|meth|mod|attr|data|exc|obj):`|\.\. math::")


def test_the_api_pages_render_what_the_docstrings_say(site):
    """No Sphinx role or directive is left raw in the site; math is arithmatex's, rendered by the KaTeX copy the
    site serves itself (offline); cross-references are links."""
    pages = {p.relative_to(site).as_posix(): p.read_text() for p in site.rglob("*.html")}
    raw = {name: RAW_ROLES.findall(text)[:3] for name, text in pages.items() if RAW_ROLES.search(text)}
    assert raw == {}
    methods = pages["api/methods/index.html"]
    assert methods.count('class="arithmatex"') > 50  # every method's loss convention among them
    assert r"\frac{\lambda}{2}" in methods  # EWC's penalty, as a display formula
    assert 'href="#lifelong.methods.quadratic.QuadraticRegularizer"' in methods  # a cross-reference, resolved
    assert "assets/katex/katex.min.js" in methods and (site / "assets" / "katex" / "katex.min.js").is_file()


def test_the_configuration_reference_includes_every_config_file():
    reference = (REPO / "docs" / "configuration.md").read_text()
    included = set(re.findall(r'--8<-- "(conf/[^"]+)"', reference))
    files = {p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert files == included, f"add to docs/configuration.md: {sorted(files - included)}"


def test_every_docs_page_is_in_the_navigation():
    nav = (REPO / "mkdocs.yml").read_text()
    pages = {
        p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*") if p.suffix in (".md", ".ipynb")
    }
    assert {p for p in pages if p not in nav} == set()


def test_the_method_example_of_extending_runs():
    """The code block of docs/extending.md defines a working method: its penalty is the formula's."""
    import torch

    page = (REPO / "docs" / "extending.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "MagnitudeAnchor" in block]
    namespace: dict = {}
    exec(compile(code, "docs/extending.md", "exec"), namespace)
    method = namespace["MagnitudeAnchor"](strength=4.0)
    net = torch.nn.Linear(3, 2)
    params = dict(net.named_parameters())
    method.consolidate(method.task_importance(None, net, 0, params), params)
    anchor = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        net.weight.add_(0.1)
    expected = 2.0 * sum((anchor[n] ** 2 * (p - anchor[n]) ** 2).sum() for n, p in net.named_parameters())
    assert method.penalty_value(net).item() == pytest.approx(expected.item(), rel=1e-5)


def _block(page: str, name: str) -> str:
    text = (REPO / "docs" / f"{page}.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", text, flags=re.S) if f"class {name}(" in block]
    return code


@pytest.mark.integration
def test_the_new_method_of_extending_is_short_and_forgets_less_than_finetuning(mnist_root, tmp_path):
    """docs/extending.md's method, written against ContinualMethod's door alone, in under 40 lines: on split
    MNIST (domain scenario, where fine-tuning forgets the first task) it keeps more of the first task."""
    import functools

    import torch

    from lifelong import train_stream
    from lifelong.data import SplitStream
    from lifelong.methods import Finetune
    from lifelong.models import MLP, ContinualClassifier

    code = _block("extending", "OutputAnchor")
    assert len(code.strip().splitlines()) < 40
    namespace: dict = {}
    exec(compile(code, "docs/extending.md", "exec"), namespace)
    first_task = {}
    for name, method in (("finetune", Finetune()), ("anchor", namespace["OutputAnchor"](weight=10.0))):
        torch.manual_seed(0)
        options = {"scenario": "domain", "epochs_per_task": 2, "max_train_samples": 4000, "max_test_samples": 500}
        stream = SplitStream(num_tasks=2, root=str(mnist_root), **options)
        stream.prepare_data()
        stream.setup("fit")
        module = ContinualClassifier.for_stream(
            MLP(stream.input_shape, stream.num_classes, hidden_sizes=(100,)),
            functools.partial(torch.optim.Adam, lr=1e-3),
            stream,
        )
        metrics = train_stream(stream, module, tmp_path / name, callbacks=[method], logger=False, progress_bar=False)
        first_task[name] = metrics["accuracy_matrix"][1][0]
    assert first_task["anchor"] > first_task["finetune"] + 0.05, first_task


def test_the_configuration_table_lists_every_method_and_preset():
    rows = {
        line.split("|")[1].strip(): line
        for line in (REPO / "docs" / "configuration.md").read_text().splitlines()
        if line.startswith("| `")
    }
    for group, row in (("method", rows["`method=`"]), ("experiment", rows["`experiment=`"])):
        for stem in sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")):
            short = "`_" + stem.rsplit("_", 1)[1] + "`" if stem.startswith("hsu2018_split_mnist_") else None
            assert f"`{stem}`" in row or (short and short in row), f"docs/configuration.md: {group}={stem} missing"
