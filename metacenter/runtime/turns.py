"""Big jobs on the reactor thread, one chunk per reactor turn.

Twisted's default cooperator runs a job's steps for up to 10 ms before it
lets the reactor serve anything else; gateways wait on us with a 100 ms
timeout and log anything above ~10 ms as slow. Here each step (sized by its
job to a millisecond or two) gets its own turn, so requests interleave.
"""

from twisted.internet import task


def _one_step():
    steps = [0]

    def done():
        steps[0] += 1
        return steps[0] > 1

    return done


def chunk_per_turn(clock):
    """A ``task.Cooperator`` that runs one step of a job per reactor turn."""
    return task.Cooperator(scheduler=lambda work: clock.callLater(0, work), terminationPredicateFactory=_one_step)
