"""inferd.device.CpuThreadShare: models computing at the same time split the CPUs; a lone model gets them all."""

from __future__ import annotations

import threading

import torch

from inferd.device import CpuThreadShare


def test_busy_holders_split_the_cpus_and_caps_hold() -> None:
    share = CpuThreadShare(num_cpus=4, hold_s=3600.0)  # a released holder stays busy for the whole test
    llm, embed, tabular = share.register(), share.register(max_threads=3), share.register()
    assert llm.num_threads() == 4 and embed.num_threads() == 3  # nobody else is busy
    llm.mark_busy()  # the LLM is stepping
    assert embed.num_threads() == 2 and llm.num_threads() == 4
    embed.mark_busy()
    tabular.mark_busy()
    assert llm.num_threads() == 1 and embed.num_threads() == 1  # 4 // 3, at least 1
    embed.release()  # within hold_s: still counted
    assert llm.num_threads() == 1
    embed.close()
    tabular.close()
    assert llm.num_threads() == 4


def test_release_expires_after_hold_s() -> None:
    share = CpuThreadShare(num_cpus=2, hold_s=0.0)
    a, b = share.register(), share.register()
    b.mark_busy()
    assert a.num_threads() == 1
    b.release()  # busy until now + 0 s: already over
    assert a.num_threads() == 2


def test_claim_sets_only_the_calling_threads_torch_threads() -> None:
    share = CpuThreadShare(num_cpus=2, hold_s=3600.0)
    other = share.register()
    other.mark_busy()
    holder = share.register()
    before = torch.get_num_threads()
    seen: list[int] = []

    def worker() -> None:
        seen.append(holder.claim())
        seen.append(torch.get_num_threads())
        holder.release()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [1, 1]
    assert torch.get_num_threads() == before


def test_without_split_each_holder_keeps_its_own_count() -> None:
    share = CpuThreadShare(num_cpus=2, hold_s=3600.0, is_split=False)
    llm, embed = share.register(), share.register(max_threads=1)
    llm.mark_busy()
    embed.mark_busy()
    assert llm.num_threads() == 2 and embed.num_threads() == 1
