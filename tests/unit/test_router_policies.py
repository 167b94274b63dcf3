"""Router policies: exact decisions of round_robin, power_of_two and cache_aware (imbalance
thresholds, match-rate threshold, tie-breaks), and the approximate radix tree's LRU bound."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest
from sglang.settings.router import RouterSettings
from sglang_router.policies import POLICIES, create_policy, policy_class
from sglang_router.policies.base import Selection, WorkerView
from sglang_router.policies.cache_aware import CacheAwarePolicy, rendezvous_score
from sglang_router.policies.power_of_two import PowerOfTwoPolicy
from sglang_router.policies.radix_tree import ApproxRadixTree, LocalTreeIndex
from sglang_router.policies.round_robin import RoundRobinPolicy

pytestmark = pytest.mark.unit


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def views(**loads: int) -> list[WorkerView]:
    return [WorkerView(w, load) for w, load in sorted(loads.items())]


def pick(policy: object, workers: Sequence[WorkerView], tokens: Sequence[int]) -> tuple[str, str]:
    sel: Selection = run(policy.select(workers, tokens))  # type: ignore[attr-defined]
    return sel.worker.worker_id, sel.decision


# ---------------------------------------------------------------------------------------------
# Approximate radix tree
# ---------------------------------------------------------------------------------------------


def test_tree_match_split_and_size() -> None:
    t = ApproxRadixTree(max_size=100)
    t.insert([1, 2, 3, 4])
    assert (t.size, t.match([1, 2, 3, 4]), t.match([1, 2, 3, 9]), t.match([5]), t.match([])) == (4, 4, 3, 0, 0)
    t.insert([1, 2, 5, 6])  # splits the edge after [1, 2]
    assert t.size == 6
    assert sorted(len(c.key) for c in t.root.children[1].children.values()) == [2, 2]
    assert (t.match([1, 2, 5, 6, 7]), t.match([1, 2])) == (4, 2)
    t.insert([1, 2])  # already there: nothing new
    assert t.size == 6
    t.check_integrity()


def test_tree_evicts_least_recently_used_leaves_exactly() -> None:
    t = ApproxRadixTree(max_size=10)
    t.insert([1, 2, 3, 4, 5, 6])  # clock 1
    t.insert([7, 8, 9, 10])  # clock 2: size 10, full
    t.insert([1, 2, 3, 20, 21])  # clock 3: splits A after [1, 2, 3]; size 12 -> evict [4, 5, 6]
    assert t.size == 9 and t.num_evicted_tokens == 3
    assert (t.match([1, 2, 3, 4]), t.match([7, 8, 9, 10]), t.match([1, 2, 3, 20, 21])) == (3, 4, 5)
    t.insert([7, 8, 9, 10])  # clock 4: B is now the most recent
    t.insert([30, 31, 32])  # clock 5: size 12 -> evict [20, 21] (clock 3), then still 10: done
    assert t.size == 10
    assert (t.match([1, 2, 3, 20]), t.match([1, 2, 3]), t.match([7, 8, 9, 10]), t.match([30, 31, 32])) == (3, 3, 4, 3)
    t.insert([40, 41])  # clock 6: size 12 -> evict [1, 2, 3] (clock 3, a leaf once its child went)
    assert t.size == 9 and t.match([1, 2, 3]) == 0
    assert (t.match([7, 8, 9, 10]), t.match([30, 31, 32]), t.match([40, 41])) == (4, 3, 2)
    t.check_integrity()


def test_tree_truncates_a_prompt_longer_than_the_bound() -> None:
    t = ApproxRadixTree(max_size=5)
    t.insert(list(range(100, 112)))
    assert t.size == 5 and t.match(list(range(100, 112))) == 5
    t.check_integrity()


def test_tree_stays_bounded_and_consistent_under_random_inserts() -> None:
    rng = random.Random(0)
    t = ApproxRadixTree(max_size=64)
    prefixes = [[rng.randrange(8) for _ in range(rng.randrange(1, 12))] for _ in range(6)]
    for _ in range(400):
        toks = rng.choice(prefixes) + [rng.randrange(8) for _ in range(rng.randrange(0, 10))]
        t.insert(toks)
        t.check_integrity()
        assert t.match(toks) == min(len(toks), 64)  # what was just inserted is never evicted first
    assert t.size <= 64 and t.num_evicted_tokens > 0


# ---------------------------------------------------------------------------------------------
# round_robin, power_of_two
# ---------------------------------------------------------------------------------------------


def test_round_robin_cycles_in_id_order() -> None:
    p = RoundRobinPolicy()
    ws = views(a=5, b=0, c=9)
    assert [pick(p, ws, [1]) for _ in range(4)] == [
        ("a", "round_robin"), ("b", "round_robin"), ("c", "round_robin"), ("a", "round_robin")
    ]


def test_power_of_two_takes_the_less_loaded_of_two_draws() -> None:
    ws = views(a=3, b=1, c=2, d=7)
    p = PowerOfTwoPolicy(seed=11)
    rng = random.Random(11)
    for _ in range(20):
        i, j = rng.sample(range(4), 2)
        expected = ws[j] if ws[j].load < ws[i].load else ws[i]
        assert pick(p, ws, [1]) == (expected.worker_id, "power_of_two")
    two = PowerOfTwoPolicy(seed=0)
    assert {pick(two, views(a=4, b=2), [1])[0] for _ in range(10)} == {"b"}
    assert pick(PowerOfTwoPolicy(), views(only=100), [1]) == ("only", "power_of_two")


# ---------------------------------------------------------------------------------------------
# cache_aware
# ---------------------------------------------------------------------------------------------


def cache_aware(max_tree_size: int = 1000, threshold: float = 0.3) -> CacheAwarePolicy:
    return CacheAwarePolicy(
        LocalTreeIndex(max_tree_size), balance_abs_threshold=64, balance_rel_threshold=1.5, cache_threshold=threshold
    )


FAMILY_A = list(range(10, 30))  # 20 tokens
FAMILY_B = list(range(50, 70))


def test_cache_aware_new_prefixes_spread_then_stick() -> None:
    p = cache_aware()
    ws = views(a=0, b=0)
    assert pick(p, ws, FAMILY_A + [1]) == ("a", "cache_miss")  # empty trees, equal load: lowest id
    assert pick(p, ws, FAMILY_B + [1]) == ("b", "cache_miss")  # a's tree is bigger: smallest tree
    for i in range(3):
        assert pick(p, ws, FAMILY_A + [100 + i, 7]) == ("a", "cache_hit")
        assert pick(p, ws, FAMILY_B + [100 + i, 7]) == ("b", "cache_hit")
    # a cache hit goes to the matching worker even when it is (moderately) busier
    assert pick(p, views(a=60, b=0), FAMILY_B + [9]) == ("b", "cache_hit")
    assert pick(p, views(a=60, b=0), FAMILY_A + [9]) == ("a", "cache_hit")


def test_cache_aware_match_rate_must_exceed_the_threshold() -> None:
    p = cache_aware(threshold=0.3)
    ws = views(a=0, b=0)
    assert pick(p, ws, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) == ("a", "cache_miss")
    # 3 of 10 tokens match a: rate 0.3 is not > 0.3 -> miss -> b (smaller tree)
    assert pick(p, ws, [1, 2, 3, 40, 41, 42, 43, 44, 45, 46]) == ("b", "cache_miss")
    # 4 of 10 match a (b holds only 3): 0.4 > 0.3 -> a
    assert pick(p, ws, [1, 2, 3, 4, 60, 61, 62, 63, 64, 65]) == ("a", "cache_hit")


def test_cache_aware_imbalance_needs_both_thresholds() -> None:
    p = cache_aware()
    ws = views(a=0, b=0)
    assert pick(p, ws, FAMILY_A) == ("a", "cache_miss")
    # abs 90 > 64 and 100 > 1.5 * 10: imbalanced -> shortest queue, despite a's prefix
    assert pick(p, views(a=100, b=10), FAMILY_A + [1]) == ("b", "imbalanced")
    # ... and the routed prompt now lives in b's tree too
    assert p.index.tree_size("b") == len(FAMILY_A) + 1  # type: ignore[attr-defined]
    p2 = cache_aware()
    assert pick(p2, ws, FAMILY_A) == ("a", "cache_miss")
    assert pick(p2, views(a=74, b=10), FAMILY_A + [1]) == ("a", "cache_hit")  # abs 64: not > 64
    assert pick(p2, views(a=300, b=220), FAMILY_A + [2]) == ("a", "cache_hit")  # 300 <= 1.5 * 220
    assert pick(p2, views(a=75, b=10), FAMILY_A + [3]) == ("b", "imbalanced")  # 65 > 64 and 75 > 15
    assert pick(p2, views(a=0, b=100, c=30), FAMILY_B) == ("a", "imbalanced")  # min over all workers


def test_cache_aware_miss_prefers_lower_load_then_smaller_tree() -> None:
    p = cache_aware()
    assert pick(p, views(a=0, b=0), FAMILY_A) == ("a", "cache_miss")
    assert pick(p, views(a=0, b=3), FAMILY_B) == ("a", "cache_miss")  # load first, tree size second
    assert pick(p, views(a=2, b=2), [200, 201, 202]) == ("b", "cache_miss")


def test_cache_aware_lru_bound_forgets_old_prefixes() -> None:
    p = cache_aware(max_tree_size=30)
    ws = views(a=0, b=0)
    assert pick(p, ws, FAMILY_A) == ("a", "cache_miss")
    assert pick(p, ws, FAMILY_B) == ("b", "cache_miss")
    assert pick(p, ws, list(range(80, 95))) == ("a", "cache_miss")  # a: 20 + 15 > 30 -> FAMILY_A evicted
    tree = p.index.trees["a"]  # type: ignore[attr-defined]
    assert tree.size == 15 and tree.match(FAMILY_A) == 0
    assert pick(p, ws, FAMILY_A + [1]) == ("a", "cache_miss")  # no longer a hit: a forgot it
    tree.check_integrity()


def test_cache_aware_forgets_removed_workers() -> None:
    p = cache_aware()
    assert pick(p, views(a=0, b=0), FAMILY_A) == ("a", "cache_miss")
    p.remove_worker("a")
    assert p.index.tree_size("a") == 0  # type: ignore[attr-defined]
    assert pick(p, views(b=0), FAMILY_A) == ("b", "cache_miss")


class _NoSizeIndex(LocalTreeIndex):
    """Like the shared index: matches, but no tree sizes."""

    def tree_size(self, worker_id: str) -> int | None:  # type: ignore[override]
        return None


def test_cache_aware_without_tree_sizes_breaks_ties_by_rendezvous_hash() -> None:
    p = CacheAwarePolicy(_NoSizeIndex(1000))
    ws = views(a=0, b=0, c=0)
    for prompt in ([1, 2, 3], [4, 5, 6, 7], [9] * 12):
        best = max(("a", "b", "c"), key=lambda w, pr=prompt: rendezvous_score(pr, w))
        assert pick(p, ws, prompt) == (best, "cache_miss")
        assert pick(CacheAwarePolicy(_NoSizeIndex(1000)), ws, prompt) == (best, "cache_miss")  # any replica


def test_registry_builds_each_policy_lazily_by_name() -> None:
    assert set(POLICIES.names()) == {"round_robin", "power_of_two", "cache_aware"}
    assert policy_class("round_robin") is RoundRobinPolicy
    assert isinstance(create_policy(RouterSettings(policy="power_of_two", seed=1)), PowerOfTwoPolicy)
    p = create_policy(RouterSettings(policy="cache_aware", max_tree_size=77, cache_threshold=0.5))
    assert isinstance(p, CacheAwarePolicy) and isinstance(p.index, LocalTreeIndex)
    assert (p.index.max_tree_size, p.cache_threshold, p.balance_abs_threshold) == (77, 0.5, 64)
    with pytest.raises(ValueError, match="unknown routing policy 'nope'"):
        policy_class("nope")
    with pytest.raises(ValueError, match="shared_index needs a Redis client"):
        create_policy(RouterSettings(policy="cache_aware", shared_index=True))
