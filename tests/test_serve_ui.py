"""The auditor's web UI and the served report in real headless Chromium (Debian's, through Playwright), against a
real `smalti serve` on loopback. The page is served by the party under audit, so the tests play that party: a
proxy in front of the page changes proofs, answers another step than asked, shows an older or a different
history; a ledger names its layers with markup. What must hold: no key ever enters the page, the green verdict
appears only for what the browser itself checked, script never runs from ledger content, and the page lays out
without clipping or overflow at 1280 and 760 pixels."""

from __future__ import annotations

import base64
import json
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
import requests

from conftest import REPO, smalti_cli
from serve_helpers import CHROMIUM_ARGS, chromium_path, make_audit_taxonomy, serving, sign_in_code
from test_ledger import train, train_policy_run

ARTIFACTS = REPO / "test-artifacts"
LONG_LAYER = "base_model.model.model.layers.{}.self_attn.q_proj.lora_A.acme_customer_pii_support_tickets"
PAYLOAD = '<img src=x onerror="alert(1)">'


def _long_names(run: Path, key) -> None:
    """Long layer names as Hugging Face and PEFT give them, and fourteen more long leaf classes (the layout case)."""
    from ledger_factory import grow_ledger

    def edit(index: int, body: dict) -> dict:
        if index:
            return body
        extra = [f"customers/region-{r}/very-long-department-name-{r:02d}/tickets" for r in range(14)]
        layers = [dict(layer, name=LONG_LAYER.format(i)) for i, layer in enumerate(body["layers"])]
        entropy = dict(body["entropy"], classes=[f"customers/{c.replace('/', '-')}-department/support-tickets-archive"
                                                 for c in body["entropy"]["classes"]])
        return dict(body, classes=body["classes"] + extra, layers=layers, routing=None, entropy=entropy)

    grow_ledger(run, 40, key, edit=edit)


def _markup_names(run: Path, key) -> None:
    """A ledger whose strings are markup (well typed: names are strings), signed by the trainer key."""
    from ledger_factory import grow_ledger

    def edit(index: int, body: dict) -> dict:
        if index:
            return body
        layers = [dict(layer, name=f"{layer['name']}{PAYLOAD}") for layer in body["layers"]]
        return dict(body, layers=layers, contribution_rule=f"<script>alert(2)</script>{PAYLOAD}",
                    fingerprints={k: f"{v}{PAYLOAD}" for k, v in body["fingerprints"].items()})

    grow_ledger(run, 6, key, edit=edit)


@pytest.fixture(scope="module")
def ui(governed, tmp_path_factory):
    from smalti.trust.keys import SigningKey

    chromium = chromium_path()
    root = tmp_path_factory.mktemp("serve_ui")
    runs = root / "runs"
    train(governed, runs / "alpha", train={"max_duration": "6ba"}, checkpoint={"interval": "2ba"})
    key = SigningKey.load(governed.key("trainer"))
    shutil.copytree(runs / "alpha", runs / "wide")
    _long_names(runs / "wide", key)
    shutil.copytree(runs / "alpha", runs / "markup")
    _markup_names(runs / "markup", key)
    policy_root = root / "policy"
    policy_root.mkdir()
    parent = train_policy_run(governed, policy_root)
    shutil.move(str(parent), str(runs / "tuned"))
    forgot = smalti_cli("forget", str(runs / "tuned"), "--class", "gutenberg/tragedy/hamlet", "--mode", "ablate",
                        "--out", str(runs / "tuned-without-hamlet"), "--eval-samples", "16", timeout=600)
    assert forgot.returncode == 0, forgot.stderr
    taxonomy = make_audit_taxonomy(governed, root)
    trainer_key = [x for x in (governed.keys / "trainer.pub").read_text().splitlines() if x.startswith("ed25519:")][0]
    with serving(runs, taxonomy, governed.trust) as (base, _):
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                yield {"base": base, "runs": runs, "auditor": root / "keys" / "auditor.key", "browser": browser,
                       "trainer_key": trainer_key, "governed": governed}
            finally:
                browser.close()


def _signed_in_page(ui, width: int = 1280, height: int = 1000):
    context = ui["browser"].new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.goto(f"{ui['base']}/ui/#code={sign_in_code(ui['base'], ui['auditor'])}")
    page.wait_for_selector("tr.run-row", timeout=30_000)
    return context, page


def _until(page, selector: str, pattern: str) -> str:
    """Wait until the element's text matches (Playwright's locator assertions: no eval, which the page's
    Content-Security-Policy forbids), and return it."""
    from playwright.sync_api import expect

    expect(page.locator(selector)).to_have_text(re.compile(pattern, re.S), timeout=30_000)
    return page.text_content(selector)


def _verdict(page) -> str:
    return _until(page, "#verdict", r"^(?!checking)\S")


def _open(page, run: str) -> None:
    page.click(f"tr.run-row[data-run='{run}'] button.run-link")
    _until(page, "#run-title", f"^{re.escape(run)}$")
    page.wait_for_selector("#heatmap rect.cell")


def test_no_key_enters_the_page_and_a_code_signed_elsewhere_signs_in(ui):
    pem = ui["auditor"].read_text()
    secret = "".join(pem.splitlines()[1:-1])
    context = ui["browser"].new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    seen: list[str] = []
    page.on("request", lambda r: seen.append(f"{r.method} {r.url} {r.headers} {r.post_data or ''}"))
    try:
        page.goto(ui["base"] + "/ui/")
        page.wait_for_selector("#sign-in:not([hidden])")
        assert page.locator("input[type=file], textarea").count() == 0  # nowhere to put a key
        source = requests.get(ui["base"] + "/ui/app.js", timeout=30).text
        assert "pkcs8" not in source and "PRIVATE KEY" not in source and '"sign"' not in source
        page.fill("#code", "not-a-code")
        page.click("#sign-in-button")
        _until(page, "#sign-in-status", "failed")
        page.fill("#code", sign_in_code(ui["base"], ui["auditor"]))
        page.click("#sign-in-button")
        page.wait_for_selector("tr.run-row", timeout=30_000)
        assert page.text_content("#who").startswith("signed in as auditor-one")
        cookie = next(c for c in context.cookies() if c["name"].startswith("smalti_session_"))
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        linked = context.new_page()  # the link `smalti auditor sign-in` prints (and opens with --open)
        linked.on("request", lambda r: seen.append(f"{r.method} {r.url} {r.headers} {r.post_data or ''}"))
        linked.goto(f"{ui['base']}/ui/#code={sign_in_code(ui['base'], ui['auditor'])}")
        linked.wait_for_selector("tr.run-row", timeout=30_000)
        assert "#code=" not in linked.url  # single use, and kept out of the history
        _open(linked, "alpha")
        linked.fill("#trainer-key", ui["trainer_key"])
        linked.fill("#inspect-step", "2")
        linked.click("#verify")
        assert _verdict(linked).startswith("verified in your browser")
    finally:
        context.close()
    assert seen and not any(secret[:40] in r or "PRIVATE KEY" in r for r in seen)


def test_the_green_verdict_is_only_for_what_the_browser_checked(ui):
    from smalti.trust.keys import PublicKey
    from smalti.governance.ledger.store import LedgerStore, ledger_path

    context, page = _signed_in_page(ui)
    try:
        _open(page, "alpha")
        page.fill("#trainer-key", ui["trainer_key"])
        page.fill("#inspect-step", "3")
        page.click("#verify")
        verdict = _verdict(page)
        assert verdict.startswith("verified in your browser: entry 3 is step 3") and "first tree" in verdict, verdict
        verifier = client_verifier(ui, "alpha")
        shown = dict(zip(page.locator("#entry th").all_text_contents(), page.locator("#entry td").all_text_contents()))
        assert shown["step"] == "3" and float(shown["loss"]) > 0  # the entry's content, not only hashes
        page.click("#verify")
        assert "the same tree this browser verified before" in _verdict(page)

        routed: list[str] = []

        def through(pattern: str, change):  # the test's proxy: the service's answer changed on its way
            def handler(route):
                response = route.fetch()
                route.fulfill(response=response, status=200, body=change(response))
            page.route(pattern, handler)
            routed.append(pattern)

        def clear() -> None:
            while routed:
                page.unroute(routed.pop())

        def check(expected: str, step: int = 3) -> None:
            page.fill("#inspect-step", str(step))
            page.click("#verify")
            verdict = _verdict(page)
            assert verdict.startswith("failed") and expected in verdict, verdict
            clear()

        def flip(response) -> str:
            proof = response.json()
            proof["audit_path"][0] = ("0" if proof["audit_path"][0][0] != "0" else "1") + proof["audit_path"][0][1:]
            return json.dumps(proof)

        through("**/proof/inclusion*", flip)
        check("does not lead to the signed root")
        client = requests.Session()
        signed_in = client.post(ui["base"] + "/api/login", json={"code": sign_in_code(ui["base"], ui["auditor"])})
        client.headers["X-Smalti-Session"] = signed_in.json()["session"]
        step3 = client.get(ui["base"] + "/api/runs/alpha/proof/inclusion?step=3").text
        through("**/proof/inclusion*", lambda response: step3)  # asked for step 5, given step 3's genuine proof
        check("asked for step 5; the service proved entry 3, which is step 3", step=5)

        def beyond(response) -> str:
            proof = response.json()
            proof["leaf_index"] = proof["tree_size"]
            return json.dumps(proof)

        through("**/proof/inclusion*", beyond)
        check("outside the tree")

        # An older signed checkpoint than this browser already verified: history was cut.
        with LedgerStore(ledger_path(ui["runs"] / "alpha"), read_only=True) as store:
            older, public = store.heads()[0], store.trainer_key.raw
        through("**/alpha/checkpoint", lambda response: older.note(public))
        check("history was cut", step=1)

        # The same size, another root, signed by the trainer: a split view (another auditor may see this one).
        note, forked = _other_history(ui, "fork", 6, edit=lambda i, body: dict(body, loss=1.5) if i == 2 else body)
        through("**/alpha/checkpoint", lambda response: note)
        through("**/proof/inclusion*", lambda response: forked)
        check("split view", step=1)

        # Another log altogether, shorter, signed by the same trainer under a name of its own: a swap, not a
        # "first tree" (the browser remembers the run's log by the run, not by the name the checkpoint gives).
        swapped_note, swapped_proof = _other_history(ui, "swapped", 3, origin="smalti/00000000deadbeef")
        through("**/alpha/checkpoint", lambda response: swapped_note)
        through("**/proof/inclusion*", lambda response: swapped_proof)
        check("now shows smalti/00000000deadbeef", step=1)
        page.fill("#trainer-key", verifier)  # a verifier key names the one log it verifies
        through("**/alpha/checkpoint", lambda response: swapped_note)
        through("**/proof/inclusion*", lambda response: swapped_proof)
        check("the verifier key you gave is for", step=1)
        page.fill("#trainer-key", ui["trainer_key"])

        # A tree this browser saw earlier, smaller: the newer one must extend it, by a proof checked here.
        memory = f"smalti-verified:{ui['base']}:alpha"
        page.evaluate(f"localStorage.setItem('{memory}', JSON.stringify({{origin: '{older.origin}', "
                      f"size: {older.size}, root: '{older.root.hex()}'}}))")
        page.fill("#inspect-step", "3")
        page.click("#verify")
        assert f"consistent with the tree of {older.size} entries" in _verdict(page)
        page.evaluate(f"localStorage.setItem('{memory}', JSON.stringify({{origin: '{older.origin}', "
                      f"size: {older.size}, root: '{'00' * 32}'}}))")
        check("does not extend the tree of")
        page.evaluate(f"localStorage.removeItem('{memory}')")

        page.fill("#trainer-key", "ed25519:" + base64.b64encode(PublicKey.load(ui["auditor"].with_suffix(".pub")).raw).decode())
        check("no signature by the trainer key")

        # Opening another run clears the verdict; a certificate is valid only once its signature verifies here.
        page.fill("#trainer-key", ui["trainer_key"])
        _open(page, "tuned-without-hamlet")
        assert page.text_content("#verdict") == ""
        _until(page, "#certificate-verdict", r"\S")
        assert page.text_content("#certificate-verdict").startswith("certificate signature verified in your browser")
        assert "gutenberg/tragedy/hamlet" in page.text_content("#certificate")

        def tamper(response) -> str:
            answer = response.json()
            message = json.loads(base64.b64decode(answer["signed_message_base64"]))
            message["class"] = "gutenberg/comedy/tempest"
            answer["signed_message_base64"] = base64.b64encode(json.dumps(message, sort_keys=True, separators=(",", ":"))
                                                               .encode()).decode()
            return json.dumps(answer)

        through("**/certificate", tamper)
        page.click("#refresh")
        _until(page, "#certificate-verdict", "^certificate not")
        assert page.locator("#certificate td").count() == 0
        clear()

        # A genuine certificate of another run, shown as if it were alpha's: not this run's.
        other = client.get(ui["base"] + "/api/runs/tuned-without-hamlet/certificate").text

        def claims_certificate(response) -> str:  # and says alpha's log is the other run's
            other_log = json.loads(other)["certificate"]["ledger_head"]["origin"]
            return json.dumps(dict(response.json(), deletion_certificate=True, origin=other_log))

        through("**/api/runs/alpha", claims_certificate)
        through("**/alpha/certificate", lambda response: other)
        _open(page, "alpha")
        _until(page, "#certificate-verdict", "not this run's")
        clear()

        # A verdict that arrives after the auditor opened another run is not shown there, nor remembered for it.
        held: list = []
        page.route("**/alpha/proof/inclusion*", lambda route: held.append(route))
        _open(page, "alpha")
        page.fill("#inspect-step", "2")
        page.click("#verify")
        while not held:
            page.wait_for_timeout(50)
        _open(page, "markup")
        held[0].continue_()
        page.wait_for_timeout(1500)
        assert page.text_content("#verdict") == ""
        assert page.evaluate(f"localStorage.getItem('smalti-verified:{ui['base']}:markup')") is None
        page.unroute("**/alpha/proof/inclusion*")

        # A session ended elsewhere: the next action says so and shows the sign-in form again.
        assert client.post(ui["base"] + "/api/logout?everywhere=true", json={}).json()["ended"] >= 2
        page.click("#refresh")
        page.wait_for_selector("#sign-in:not([hidden])")
        assert "session ended" in page.text_content("#sign-in-status")
    finally:
        context.close()


def _other_history(ui, name: str, steps: int, edit=None, origin: str | None = None) -> tuple[str, str]:
    """Alpha's entries rewritten (``edit``), under another log name (``origin``), signed by the trainer: the signed
    checkpoint and step 1's inclusion proof a dishonest service would show in alpha's place."""
    from ledger_factory import grow_ledger
    from smalti.trust.keys import SigningKey
    from smalti.governance.ledger.store import LedgerStore, ledger_path

    copy = ui["runs"].parent / name
    shutil.copytree(ui["runs"] / "alpha", copy)
    if origin is not None:
        with sqlite3.connect(copy / "ledger.sqlite") as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'origin'", (origin,))
    grow_ledger(copy, steps, SigningKey.load(ui["governed"].key("trainer")), edit=edit)
    with LedgerStore(ledger_path(copy), read_only=True) as store:
        note = store.heads()[-1].note(store.trainer_key.raw)
    return note, _proof_from(copy, 1)


def client_verifier(ui, run: str) -> str:
    """The run's note verifier key, as the trainer gives it (smalti ledger checkpoint RUN --verifier-key)."""
    from conftest import smalti_cli as cli

    return cli("ledger", "checkpoint", str(ui["runs"] / run), "--verifier-key").stdout.strip()


def _proof_from(run: Path, step: int) -> str:
    from smalti.trust import merkle
    from smalti.governance.ledger.store import LedgerStore, ledger_path

    with LedgerStore(ledger_path(run), read_only=True) as store:
        head = store.heads()[-1]
        index, leaf, data = store.entry_at_step(step)
        leaves = store.leaves(stop=head.size)
    return json.dumps({"step": step, "leaf_index": index, "tree_size": head.size,
                       "entry_base64": base64.b64encode(data).decode(), "leaf_hash": leaf.hex(),
                       "audit_path": [p.hex() for p in merkle.inclusion_proof(index, leaves)], "tree_head": {}})


def _boxes(page, selector: str) -> list[dict]:
    return page.eval_on_selector_all(selector, "nodes => nodes.map(n => { const b = n.getBoundingClientRect(); "
                                               "return {x: b.left, y: b.top, r: b.right, b: b.bottom, t: n.textContent}; })")


def _overlap(a: dict, b: dict) -> bool:
    return a["x"] < b["r"] - 0.5 and b["x"] < a["r"] - 0.5 and a["y"] < b["b"] - 0.5 and b["y"] < a["b"] - 0.5


@pytest.mark.parametrize("width", [1280, 760])
def test_the_page_lays_out_without_clipping_overlap_or_overflow(ui, width):
    context, page = _signed_in_page(ui, width=width, height=1400)
    try:
        _open(page, "wide")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "the page scrolls sideways"
        svg = _boxes(page, "#heatmap")[0]
        page.evaluate("document.getElementById('heatmap-box').scrollLeft = 0")
        classes, layers, cells = (_boxes(page, "#heatmap .class-label"), _boxes(page, "#heatmap .layer-label"),
                                  _boxes(page, "#heatmap rect.cell"))
        assert len(classes) >= 14 + 4 and len(layers) >= 5
        first_cell_x, first_cell_y = min(c["x"] for c in cells), min(c["y"] for c in cells)
        for label in classes + layers:  # whole, inside the drawing: nothing cut at an edge
            assert label["x"] >= svg["x"] - 0.5 and label["y"] >= svg["y"] - 0.5, label
            assert label["r"] <= svg["r"] + 0.5 and label["b"] <= svg["b"] + 0.5, label
        assert all(label["r"] <= first_cell_x + 0.5 for label in layers)  # no layer name under the cells
        assert all(label["b"] <= first_cell_y + 0.5 for label in classes)  # no class name over them
        for group in (classes, layers):
            assert not any(_overlap(a, b) for i, a in enumerate(group) for b in group[i + 1:]), "labels collide"
        assert page.locator("#heatmap .scale").count() > 0 and page.locator("#heatmap .scale-label").count() == 3
        if width == 1280:
            assert all(label["r"] <= width for label in classes + layers)  # in the viewport itself
        assert page.locator("#entropy .axis text").count() >= 6  # ticks with values and the axis titles
        assert page.locator("#entropy-legend li").count() > 0
        nodes = _boxes(page, "#lineage g.node")
        lineage = _boxes(page, "#lineage")[0]
        assert len(nodes) == len(page.locator("tr.run-row").all())
        assert not any(_overlap(a, b) for i, a in enumerate(nodes) for b in nodes[i + 1:])
        assert all(n["r"] <= lineage["r"] + 0.5 and n["b"] <= lineage["b"] + 0.5 for n in nodes)
        edges = page.locator("#lineage path.edge")
        assert edges.count() >= 1 and edges.first.get_attribute("marker-end") == "url(#arrow)"
        assert "replay: forgot hamlet" in page.text_content("#lineage")
        assert page.eval_on_selector("tr.run-row button.run-link", "b => getComputedStyle(b).cursor") == "pointer"
        page.fill("#step", "3")
        page.dispatch_event("#step", "change")
        _until(page, "#step-label", r"^3 \(3 entries\)")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"serve-ui-{width}.png"), full_page=True)
    finally:
        context.close()


def test_the_report_shows_ledger_markup_as_text_and_runs_no_script(ui, tmp_path):
    context, page = _signed_in_page(ui)
    dialogs: list[str] = []
    context.on("page", lambda opened: opened.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss())))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    try:
        _open(page, "markup")
        with context.expect_page() as opened:
            page.click("#open-report")  # a one-use link the page asks for: a navigation carries no header
        report = opened.value
        report.wait_for_selector("#status")
        assert "/report/" in report.url and report.url.split("/report/")[1]
        again = requests.get(report.url, timeout=30)
        assert again.status_code == 404 and "ticket" in again.json()["error"]  # used once
        text = report.text_content("body")
        assert PAYLOAD in text and "<script>alert(2)</script>" in text  # shown, as text
        assert report.locator("img[src=x]").count() == 0 and report.locator("body script").count() == 0
        # Escaping alone, without the service's Content-Security-Policy: the same report as a file.
        from smalti.workflows.report import write_report
        from smalti.governance.ledger.verify import verify_ledger

        offline = write_report(ui["runs"] / "markup", tmp_path / "report.html", verify_ledger(ui["runs"] / "markup"))
        page.goto(offline.as_uri())
        page.wait_for_selector("#status")
        assert PAYLOAD in page.text_content("body") and page.locator("img[src=x]").count() == 0
        assert oct(offline.stat().st_mode & 0o777) != oct(0o600)  # the usual umask, not private
        # A loss that is markup (the defect found): refused where entries are decoded, named in a JSON 422.
        from ledger_factory import grow_ledger
        from smalti.trust.keys import SigningKey

        shutil.copytree(ui["runs"] / "alpha", ui["runs"] / "badloss")
        grow_ledger(ui["runs"] / "badloss", 6, SigningKey.load(ui["governed"].key("trainer")),
                    edit=lambda i, body: dict(body, loss=PAYLOAD) if i == 6 else body)
        from serve_helpers import Client

        answer = Client(ui["base"], ui["auditor"]).get("/api/runs/badloss/report")
        assert answer.status_code == 422 and "entry 6 is malformed (loss: expected a number)" in answer.json()["error"]
        assert str(ui["runs"]) not in answer.text
    finally:
        context.close()
        shutil.rmtree(ui["runs"] / "badloss", ignore_errors=True)
    assert dialogs == []


def test_the_offline_reports_entropy_legend_does_not_cover_the_class_labels(ui, tmp_path):
    from smalti.workflows.report import write_report
    from smalti.governance.ledger.verify import verify_ledger

    report = write_report(ui["runs"] / "wide", tmp_path / "report.html", verify_ledger(ui["runs"] / "wide"))
    context = ui["browser"].new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    try:
        page.goto(report.as_uri())
        legend = _boxes(page, "#entropy svg g[id^=legend]")
        left = _boxes(page, "#entropy svg g[id=axes_1] g[id^=patch]")  # the left panel's plotting area
        labels = _boxes(page, "#entropy svg g[id=axes_2] g[id^=ytick] text")
        assert legend and labels and left
        assert not any(_overlap(a, b) for a in legend for b in labels), "the legend covers class labels"
        assert not any(_overlap(a, b) for a in left for b in labels), "class labels run into the left panel"
    finally:
        context.close()


def test_the_served_report_trusts_only_the_taxonomys_trainer_and_reads_nothing_outside(ui, tmp_path):
    """A certificate re-signed by an outsider whose parent is a ledger outside the folder, and a checkpoints folder
    that is a link out of it: the report says NOT SIGNED, reads neither, writes nowhere, and names no path."""
    import os

    from serve_helpers import Client
    from smalti.workflows.certificate import CERTIFICATE, sign_certificate
    from smalti.trust.keys import SigningKey

    runs, outside = ui["runs"], tmp_path / "outside"
    shutil.copytree(runs / "tuned", outside / "parent")
    shutil.copytree(runs / "tuned-without-hamlet", runs / "recertified")
    certificate = json.loads((runs / "recertified" / CERTIFICATE).read_text())
    certificate["parent"] = dict(certificate["parent"], run_dir=str(outside / "parent"))
    outsider = SigningKey.load(ui["auditor"].parent / "outsider.key")
    (runs / "recertified" / CERTIFICATE).write_text(json.dumps(sign_certificate(certificate, outsider)))
    shutil.copytree(runs / "alpha", runs / "linked")
    shutil.move(str(runs / "linked" / "checkpoints"), str(outside / "checkpoints"))
    (runs / "linked" / "checkpoints").symlink_to(outside / "checkpoints", target_is_directory=True)
    shutil.copytree(runs / "alpha", runs / "pointer")  # the latest pointer a link out of the folder
    (runs / "pointer" / "checkpoints" / "latest").unlink()
    (runs / "pointer" / "checkpoints" / "latest").symlink_to(outside / "checkpoints" / "latest")
    shutil.copytree(runs / "alpha", runs / "borrowed")  # another run's genuine certificate, copied in
    shutil.copy2(runs / "tuned-without-hamlet" / CERTIFICATE, runs / "borrowed" / CERTIFICATE)
    shutil.copytree(runs / "alpha", runs / "odd")  # names TeX would read, an empty checkpoint digest
    from ledger_factory import grow_ledger

    grow_ledger(runs / "odd", 6, SigningKey.load(ui["governed"].key("trainer")), edit=lambda i, body: dict(
        body, layers=[dict(layer, name="$\\foo$" + "{" * 400 + "x" + "}" * 400 + "$") for layer in body["layers"]])
        if i == 0 else body)
    for sidecar in (runs / "odd" / "checkpoints").glob("*.sha256"):
        sidecar.write_text("")
    stamps = {p: os.stat(p).st_mtime_ns for p in (outside / "parent", runs / "tuned", runs / "recertified")}
    try:
        client = Client(ui["base"], ui["auditor"])
        report = client.get("/api/runs/recertified/report")
        assert report.status_code == 200
        assert "CERTIFICATE NOT SIGNED by the taxonomy's trainer key" in report.text
        assert "CERTIFICATE VERIFIED" not in report.text and "SIGNATURE VERIFIED" not in report.text
        genuine = client.get("/api/runs/tuned-without-hamlet/report").text
        assert "CERTIFICATE SIGNATURE VERIFIED against the taxonomy's trainer key" in genuine
        linked = client.get("/api/runs/linked/report").text
        assert "no checkpoints folder of its own" in linked
        assert "no checkpoints folder of its own" in client.get("/api/runs/pointer/report").text
        borrowed = client.get("/api/runs/borrowed/report").text
        assert "CERTIFICATE OF ANOTHER RUN" in borrowed and "SIGNATURE VERIFIED" not in borrowed
        odd = client.get("/api/runs/odd/report")
        assert odd.status_code == 200 and "$\\foo$" in odd.text
        for text in (report.text, genuine, linked):
            assert str(runs) not in text and str(tmp_path) not in text and str(outside) not in text
        assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps  # nothing written, in or out of the folder
        assert not list((outside / "parent").glob("ledger.sqlite-*"))
    finally:
        shutil.rmtree(runs / "recertified")
        (runs / "linked" / "checkpoints").unlink()
        for name in ("linked", "pointer", "borrowed", "odd"):
            shutil.rmtree(runs / name)
