"""DeepSeek-V3 ``noaux_tc`` expert selection for one token, written out on Python floats (architecture.md §2.10):
the independent oracle the MoE routing and balance-loss tests compare with."""


def select_experts_by_hand(sel: list[float], top_k: int, n_group: int, topk_group: int) -> list[int]:
    """The experts one token is routed to, given its selection scores ``sel`` (sigmoid score + bias): keep the
    topk_group groups whose two best ``sel`` sum highest, then the top_k experts by ``sel`` among them."""
    E = len(sel)
    per = E // n_group
    group_score = [sum(sorted(sel[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(n_group)]
    kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
    return sorted((e for e in range(E) if e // per in kept), key=lambda e: -sel[e])[:top_k]
