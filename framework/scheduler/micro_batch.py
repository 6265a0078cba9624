"""Built-in micro-batch policies."""

from __future__ import annotations

from framework.scheduler.base import MicroBatchScheduler, is_decoding


class FCFSMicroBatchScheduler(MicroBatchScheduler):
    """Decode tokens first (one each, plus the drafts to verify while the budget lasts, so running
    requests never stall), then prompt or recompute chunks in arrival order, each as large as the
    remaining token budget allows. A prompt longer than the budget is computed over several steps
    (chunked prefill)."""

    def schedule(self, fitting):
        decoding = [r for r in fitting if is_decoding(r)]
        catching_up = [r for r in fitting if not is_decoding(r)]
        batch = decoding[: min(self.max_batch_size, self.max_num_tokens)]
        for request in batch:
            request.num_scheduled_tokens = 1
        budget = self.max_num_tokens - len(batch)
        for request in batch:  # drafts to verify: after every decode row has its token
            extra = min(request.num_missing_tokens - 1, budget)
            request.num_scheduled_tokens += extra
            budget -= extra
        for request in catching_up:
            if budget == 0 or len(batch) >= self.max_batch_size:
                break
            request.num_scheduled_tokens = min(request.num_missing_tokens, budget)
            budget -= request.num_scheduled_tokens
            batch.append(request)
        return batch


class EqualProgressMicroBatchScheduler(MicroBatchScheduler):
    """Like fcfs for decode tokens, but splits the remaining budget evenly among the requests that
    are catching up, so several long prompts advance together instead of one after another."""

    def schedule(self, fitting):
        decoding = [r for r in fitting if is_decoding(r)]
        catching_up = [r for r in fitting if r not in decoding]
        batch = decoding[: min(self.max_batch_size, self.max_num_tokens)]
        for request in batch:
            request.num_scheduled_tokens = 1
        budget = self.max_num_tokens - len(batch)
        catching_up = catching_up[: max(0, self.max_batch_size - len(batch))]
        while budget > 0 and catching_up:
            share = max(1, budget // len(catching_up))
            still_missing = []
            for request in catching_up:
                if budget == 0:
                    break
                if request not in batch:
                    request.num_scheduled_tokens = 0
                    batch.append(request)
                take = min(request.num_missing_tokens - request.num_scheduled_tokens, share, budget)
                request.num_scheduled_tokens += take
                budget -= take
                if request.num_scheduled_tokens < request.num_missing_tokens:
                    still_missing.append(request)
            catching_up = still_missing
        return batch
