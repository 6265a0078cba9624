"""Built-in micro-batch policies."""

from __future__ import annotations

from framework.scheduler.base import Chunk, MicroBatchScheduler, is_decoding


class FCFSMicroBatchScheduler(MicroBatchScheduler):
    """Decode tokens first (one each, plus the drafts to verify while the budget lasts, so running
    requests never stall), then prompt or recompute chunks in arrival order, each as large as the
    remaining token budget allows. A prompt longer than the budget is computed over several steps
    (chunked prefill)."""

    def schedule(self, fitting):
        decode_rows = self._decode_rows(fitting)
        budget = self.max_num_tokens - len(decode_rows)
        plan = []
        for request in decode_rows:  # drafts to verify: after every decode row has its token
            drafts = min(request.num_missing_tokens - 1, budget)
            plan.append(Chunk(request, 1 + drafts))
            budget -= drafts
        for request in fitting:
            if budget == 0 or len(plan) >= self.max_batch_size:
                break
            if not is_decoding(request):
                plan.append(Chunk(request, min(request.num_missing_tokens, budget)))
                budget -= plan[-1].num_tokens
        return plan


class EqualProgressMicroBatchScheduler(MicroBatchScheduler):
    """Like fcfs for decode tokens, but splits the remaining budget evenly among the requests that
    are catching up, so several long prompts advance together instead of one after another."""

    def schedule(self, fitting):
        decode_rows = self._decode_rows(fitting)
        tokens = {id(r): 1 for r in decode_rows}
        batch = list(decode_rows)
        budget = self.max_num_tokens - len(batch)
        catching_up = [r for r in fitting if not is_decoding(r)][: max(0, self.max_batch_size - len(batch))]
        while budget > 0 and catching_up:
            share = max(1, budget // len(catching_up))
            still_missing = []
            for request in catching_up:
                if budget == 0:
                    break
                if id(request) not in tokens:
                    tokens[id(request)] = 0
                    batch.append(request)
                take = min(request.num_missing_tokens - tokens[id(request)], share, budget)
                tokens[id(request)] += take
                budget -= take
                if tokens[id(request)] < request.num_missing_tokens:
                    still_missing.append(request)
            catching_up = still_missing
        return [Chunk(r, tokens[id(r)]) for r in batch]
