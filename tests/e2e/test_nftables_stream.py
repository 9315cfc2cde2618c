"""The nftables mode's streamed full sync against the real nft and kernel: a full render fed
to `nft -f -` in parts gives the table its joined text gives; a transaction nft refuses
part way through the stream changes nothing and names the error."""

from __future__ import annotations

import json

from proxy.testbed import Testbed

SNIPPET = r"""
import json, subprocess
from collections import Counter
from kube_proxy_py_bench.control_plane import objects
from proxy.endpoints.store import ENDPOINT_SLICE, SERVICE, Store
from proxy.nftables.nft import open_both
from proxy.nftables.render import FullStream, NftConfig, render

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

r = {}
joined = render(model, cfg).text
p = subprocess.run(["nft", "-f", "-"], input=joined, capture_output=True, text=True)
r["joined"] = [p.returncode, p.stderr]
from_text = table()
subprocess.run(["nft", "delete", "table", "ip", "kube-proxy"], check=True)
s = FullStream(model, cfg, part_elements=100)
parts = []
def counted():
    for part in s:
        parts.append(len(part))
        yield part
out = nft.cmd.run_parts(counted())
r["stream"] = [out.result.rc, out.result.err, len(parts), s.result().elements]
r["same"] = table() == from_text
r["dnat_elements"] = from_text[":"]

produced = []
def refused():
    it = iter(FullStream(model, cfg, part_elements=100))
    produced.append(next(it))
    yield produced[-1]
    bad = "add element ip kube-proxy service-ips { 198.19.255.1 . tcp . 80 : goto nowhere }"
    produced.append(bad + "\n")
    yield produced[-1]
    for p in it:
        produced.append(p)
        yield p
out = nft.cmd.run_parts(refused())
r["refused"] = [out.result.rc, out.result.err, len(produced)]
r["unchanged"] = table() == from_text
print(json.dumps(r))
"""


def test_streamed_full_sync_is_one_transaction(testbed: Testbed) -> None:
    host = testbed.add_external("nftstream", "198.18.200.2")
    r = json.loads(host.python(SNIPPET, timeout=300).stdout)
    assert r["joined"][0] == 0, r["joined"][1]
    rc, err, parts, elements = r["stream"]
    assert rc == 0, err
    assert parts > 5  # really fed in parts
    assert elements >= 300 * 3 + 300  # endpoints + frontends
    assert r["same"] is True
    assert r["dnat_elements"] >= 300 * 4  # the listing holds the elements compared
    rc, err, produced = r["refused"]
    assert rc != 0 and "nowhere" in err
    assert produced > 5  # the whole stream went in: one transaction
    assert r["unchanged"] is True  # and it changed nothing
