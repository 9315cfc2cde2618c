"""The manifests source: files and directories, edits picked up, bad YAML keeps old objects."""

from __future__ import annotations

import logging

import yaml

from proxy.endpoints.manifests import ManifestsSource
from proxy.endpoints.store import Store
from tests.unit.factories import endpoint, service, slice_


def _write(path, *docs) -> None:
    path.write_text(yaml.safe_dump_all(list(docs)))


def test_directory_and_list_kind(tmp_path) -> None:
    _write(tmp_path / "a.yaml", service("web"), slice_("web"))
    (tmp_path / "b.json").write_text(
        '{"kind": "List", "items": ['
        + yaml.safe_dump(service("db", ip="198.19.0.11"), default_flow_style=True)
        + "]}"
    )
    (tmp_path / "notes.txt").write_text("ignored")
    _write(tmp_path / "deploy.yaml", {"kind": "Deployment", "metadata": {"name": "x"}})
    store = Store()
    ManifestsSource(str(tmp_path), store).reload()
    m = store.snapshot().model
    assert set(m.services) == {("default", "web"), ("default", "db")}
    assert store.has_synced


def test_edits_are_picked_up_and_bad_yaml_keeps_previous(tmp_path, caplog) -> None:
    f = tmp_path / "web.yaml"
    _write(f, service("web"), slice_("web"))
    store = Store()
    src = ManifestsSource(str(f), store)
    assert src.reload()
    store.snapshot()
    assert not src.reload()  # unchanged: nothing re-read

    _write(f, service("web"), slice_("web", endpoints=[endpoint("198.18.1.77")]))
    assert src.reload()
    snap = store.snapshot()
    assert snap.changed == {("default", "web")}
    assert [e.ip for e in snap.model.endpoints[("default", "web")].ports[("http", "TCP")]] == [
        "198.18.1.77"
    ]

    f.write_text("kind: Service\nmetadata: {name: [unclosed\n")
    with caplog.at_level(logging.WARNING):
        assert src.reload()
    assert "is not valid YAML" in caplog.text and "keeping its previous objects" in caplog.text
    snap = store.snapshot()
    assert snap.changed == frozenset()
    assert ("default", "web") in snap.model.services


def test_removed_file_removes_its_objects(tmp_path) -> None:
    _write(tmp_path / "a.yaml", service("web"), slice_("web"))
    _write(tmp_path / "b.yaml", service("db", ip="198.19.0.11"))
    store = Store()
    src = ManifestsSource(str(tmp_path), store)
    src.reload()
    store.snapshot()
    (tmp_path / "b.yaml").unlink()
    src.reload()
    assert set(store.snapshot().model.services) == {("default", "web")}


def test_unreadable_or_vanished_directory_keeps_objects(tmp_path, monkeypatch, caplog) -> None:
    """Running out of descriptors, or the directory being swapped, must not delete every
    Service (os.walk would report an unreadable directory as empty)."""
    import os

    root = tmp_path / "m"
    root.mkdir()
    _write(root / "a.yaml", service("web"), slice_("web"))
    store = Store()
    src = ManifestsSource(str(root), store)
    src.reload()
    store.snapshot()

    def failing_walk(top, onerror=None, **kw):
        onerror(OSError(24, "Too many open files"))
        return iter(())

    monkeypatch.setattr(os, "walk", failing_walk)
    _write(root / "b.yaml", service("db", ip="198.19.0.11"))  # a change, so it re-reads
    with caplog.at_level(logging.WARNING):
        assert not src.reload()
    assert "Too many open files" in caplog.text
    monkeypatch.undo()
    assert set(store.snapshot().model.services) == {("default", "web")}

    (root / "a.yaml").unlink()
    (root / "b.yaml").unlink()
    root.rmdir()
    assert not src.reload()
    assert "is gone" in caplog.text
    assert ("default", "web") in store.snapshot().model.services


def test_only_changed_files_are_parsed_again(tmp_path, monkeypatch) -> None:
    import proxy.endpoints.manifests as manifests

    _write(tmp_path / "a.yaml", service("web"), slice_("web"))
    _write(tmp_path / "b.yaml", service("db", ip="198.19.0.11"))
    store = Store()
    src = ManifestsSource(str(tmp_path), store)
    src.reload()
    parsed = []
    real = manifests.load_objects
    monkeypatch.setattr(manifests, "load_objects", lambda p: parsed.append(p.name) or real(p))
    _write(tmp_path / "b.yaml", service("db", ip="198.19.0.12"))
    assert src.reload()
    assert parsed == ["b.yaml"]
    m = store.snapshot().model
    assert m.services[("default", "db")].cluster_ips == ("198.19.0.12",)
    assert ("default", "web") in m.services  # a.yaml's objects kept without re-reading
