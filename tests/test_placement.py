"""harness.placement: the precheck names what no alive node has (pure functions, no Ray)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from harness.placement import hosts, label_matches, missing_on_node, precheck, unschedulable_reason
from harness.spec import Environment, parse_sweep


def node(node_id: str, cpu: float = 4.0, labels: dict | None = None, alive: bool = True, **resources: float) -> dict:
    return {"NodeID": node_id * 8, "Alive": alive, "Resources": {"CPU": cpu, **resources}, "Labels": labels or {}}


def test_a_missing_label_is_named_not_the_first_check_of_the_first_node():
    """The training node was missing: the message used to say 'missing CPU >= 1' (the head has no CPU)."""
    training = Environment(name="training", resources={"train": 1}, label_selector={"node-role": "train"})
    nodes = [node("head", cpu=0, labels={"node-role": "head"}, train=1),
             node("replay", labels={"node-role": "replay"})]
    reason = unschedulable_reason(training, nodes)
    assert reason.startswith("no node of the cluster (2 alive) can host environment 'training'"), reason
    assert "missing label node-role=train" in reason and "CPU" not in reason, reason


def test_every_requirement_no_node_meets_is_named():
    env = Environment(name="gpu", num_gpus=1, accelerator_type="H100", resources={"ghost": 2})
    reason = unschedulable_reason(env, [node("a", labels={}), node("b", GPU=1, **{"accelerator_type:A10G": 1})])
    assert "missing accelerator_type:H100, resource ghost >= 2" in reason, reason
    assert "GPU >= 1" not in reason  # node b has a GPU
    assert "(accelerator types present: A10G)" in reason


def test_requirements_met_only_on_different_nodes():
    env = Environment(name="split", num_gpus=1, label_selector={"cpu-family": "amd"})
    nodes = [node("gpu", GPU=1, labels={"cpu-family": "intel"}), node("amd", labels={"cpu-family": "amd"})]
    reason = unschedulable_reason(env, nodes)
    assert "no single node has all of CPU >= 1, GPU >= 1, label cpu-family=amd" in reason, reason
    assert "lacks" in reason


def test_dead_nodes_do_not_count():
    env = Environment(name="e")
    assert unschedulable_reason(env, [node("dead", alive=False)]).endswith("no node is alive")
    assert unschedulable_reason(env, [node("dead", alive=False), node("ok")]) is None
    assert hosts(env, [node("dead", alive=False), node("ok")]) == frozenset({"ok" * 8})


def test_missing_on_node_lists_everything_the_node_lacks():
    env = Environment(name="e", num_cpus=8, resources={"train": 1})
    assert missing_on_node(env, node("a")) == "CPU >= 8, resource train >= 1"
    assert missing_on_node(env, node("a", cpu=8, train=1)) is None


def test_precheck_keys_the_training_environment_apart():
    sweep = parse_sweep({"scenarios": ["s"], "training": {"resources": {"train": 1}},
                         "environments": {"cpu-default": {}, "gpu": {"num_gpus": 1}}})
    out = precheck(sweep, [node("cpu")])
    assert set(out) == {"training", "gpu"}
    assert "resource train >= 1" in out["training"] and "GPU >= 1" in out["gpu"]


SELECTOR_VALUES = st.sampled_from(["a", "b", "c"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["k1", "k2"]), st.tuples(st.booleans(), st.lists(SELECTOR_VALUES, min_size=1,
                                                                                           max_size=3, unique=True))),
       st.dictionaries(st.sampled_from(["k1", "k2", "k3"]), SELECTOR_VALUES))
def test_label_selector_semantics(selector, labels):
    """``in(...)`` is membership, ``!`` its negation, a bare value is ``in(value)``; all keys must hold."""
    exprs = {}
    for key, (negate, values) in selector.items():
        body = values[0] if len(values) == 1 else f"in({','.join(values)})"
        exprs[key] = ("!" if negate else "") + body
    expected = all((labels.get(k) in values) != negate for k, (negate, values) in selector.items())
    assert label_matches(exprs, labels) == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.fixed_dictionaries({"cpu": st.sampled_from([0, 1, 2]), "gpu": st.sampled_from([0, 1]),
                                       "role": st.sampled_from(["train", "replay"]), "alive": st.booleans()}),
                max_size=4),
       st.sampled_from([0.5, 1, 2]), st.sampled_from([0, 1]), st.sampled_from([None, "train", "replay"]))
def test_reason_is_none_exactly_when_a_node_hosts_it(specs, cpus, gpus, role):
    nodes = [node(f"n{i}", cpu=s["cpu"], labels={"role": s["role"]}, alive=s["alive"], GPU=s["gpu"])
             for i, s in enumerate(specs)]
    env = Environment(name="e", num_cpus=cpus, num_gpus=gpus, label_selector={"role": role} if role else {})
    reason = unschedulable_reason(env, nodes)
    assert (reason is None) == bool(hosts(env, nodes))
    if reason is not None and ": missing " in reason:
        # each requirement it names is one no alive node meets
        for text in reason.split(": missing ", 1)[1].split(", "):
            assert all(text in (missing_on_node(env, n) or "") for n in nodes if n["Alive"]), (text, nodes)
