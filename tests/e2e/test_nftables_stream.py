"""The nftables mode's streamed full sync against the real nft and kernel: a full render fed
to `nft -f -` in parts, as one transaction or as several (a freshly created table), gives
the same table; a refused transaction stops the stream and says why."""

from __future__ import annotations

import json

from proxy.testbed import Testbed

SNIPPET = r"""
import json, subprocess
from collections import Counter
from kube_proxy_py_bench.control_plane import objects
from proxy.endpoints.store import ENDPOINT_SLICE, SERVICE, Store
from proxy.nftables.nft import open_both
from proxy.nftables.render import FullStream, NftConfig

store = Store()
svcs, slices = objects(300, 3)
store.replace(SERVICE, svcs)
store.replace(ENDPOINT_SLICE, slices)
model = store.snapshot().model
cfg = NftConfig(family=4, node_name="node-a", cluster_cidrs=("198.18.0.0/16",))
nft = open_both()

def table():
    out = subprocess.run(["nft", "list", "table", "ip", "kube-proxy"], capture_output=True,
                         text=True, check=True).stdout
    return Counter(out.replace(",", " ").split())

r = {"created": nft.create_table("ip kube-proxy"), "again": nft.create_table("ip kube-proxy")}
s = FullStream(model, cfg, part_elements=100)
out = nft.cmd.run_parts(s, split_bytes=8_000)
r["split"] = [out.result.rc, out.transactions, out.result.err, s.result().elements]
split_table = table()
s = FullStream(model, cfg)
out = nft.run_parts(s)  # the table exists: one transaction recreating it
r["one"] = [out.result.rc, out.transactions, out.result.err, s.result().elements]
r["same"] = table() == split_table
r["dnat_elements"] = split_table[":"]

produced = []
def refused():
    parts = iter(FullStream(model, cfg, part_elements=100))
    produced.append(next(parts))
    yield produced[-1]
    produced.append(
        "add element ip kube-proxy service-ips { 198.19.255.1 . tcp . 80 : goto nowhere }\n"
    )
    yield produced[-1]
    for p in parts:
        produced.append(p)
        yield p
subprocess.run(["nft", "delete", "table", "ip", "kube-proxy"], check=True)
nft.create_table("ip kube-proxy")
out = nft.cmd.run_parts(refused(), split_bytes=1)
r["refused"] = [out.result.rc, out.transactions, out.result.err, len(produced)]
print(json.dumps(r))
"""


def test_streamed_full_sync_split_or_whole_gives_one_table(testbed: Testbed) -> None:
    host = testbed.add_external("nftstream", "198.18.200.2")
    r = json.loads(host.python(SNIPPET, timeout=300).stdout)
    assert r["created"] is True and r["again"] is False
    rc, txns, err, elements = r["split"]
    assert rc == 0, err
    assert txns > 3  # really several transactions
    assert elements >= 300 * 3 + 300  # endpoints + frontends
    rc, txns, err, elements2 = r["one"]
    assert rc == 0, err
    assert txns == 1 and elements2 == elements
    assert r["same"] is True
    assert r["dnat_elements"] >= 300 * 4  # every element with a value is in the table
    rc, txns, err, produced = r["refused"]
    assert rc != 0 and "nowhere" in err
    # it stopped there: the head, the refused part and at most the part rendered meanwhile
    assert txns == 2 and produced <= 3
