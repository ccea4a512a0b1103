"""runtime.serve.worker.Outbox: with shared rounds, what the model's thread emits reaches
the event loop once a round (flush), every job's items in order."""

from __future__ import annotations

import asyncio
import threading

from runtime.serve.worker import Job, Outbox


def test_items_wait_for_the_flush_and_arrive_in_order():
    async def main():
        loop = asyncio.get_running_loop()
        box = Outbox()
        jobs = [Job(start=None, loop=loop, outbox=box) for _ in range(3)]
        handed = threading.Event()

        def model_thread():  # one round's tokens, then the hand-over before the next decode
            for step in range(2):
                for i, job in enumerate(jobs):
                    job.emit((i, step))
            assert all(job.queue.empty() for job in jobs)  # nothing before the flush
            box.flush()
            handed.set()

        t = threading.Thread(target=model_thread)
        t.start()
        await asyncio.to_thread(handed.wait)
        t.join()
        got = [[await asyncio.wait_for(job.queue.get(), 5) for _ in range(2)] for job in jobs]
        assert got == [[(i, 0), (i, 1)] for i in range(3)]
        box.flush()  # an empty flush hands nothing over
        await asyncio.sleep(0)
        assert all(job.queue.empty() for job in jobs)

    asyncio.run(main())


def test_a_closed_loop_cancels_the_jobs_it_held():
    loop = asyncio.new_event_loop()
    box = Outbox()
    job = Job(start=None, loop=loop, outbox=box)
    loop.close()
    job.emit("token")
    box.flush()
    assert job.cancelled.is_set()  # nobody listens: the model's thread stops the job
