"""The supervisor actor: one loop that takes the front door's commands from one inbox, spawns a
session actor per session, routes LiveKit webhooks to the actor that owns the room, and reaps
actors that end. It is the registry's one writer, and, with several processes, routes commands
to the process that owns a session and adopts sessions whose lease another process lost.

`core` holds the `Supervisor`: its inbox, its loop and the message table (`_handle`), its
lifecycle. Every other module is one collaborator it owns and calls from that loop only:

- `children`: the session actors running here, by id and by room, their views;
- `spawning`: whether a session may be created now (the limits), which instances serve it;
- `idempotency`: creates under an Idempotency-Key (look-up, spawn, saved, replayed);
- `pool_tending`: warm pools as the loop acts on them (take, tend, fill, members' ends);
- `registry_writer`: registrations, health results, lost processes;
- `rooms`: LiveKit's webhooks, outages and the rooms compared with the sessions;
- `routing`: the commands for one session: here, from the store, or in another process;
- `offload`: the I/O run outside the loop, as tasks the supervisor owns.
"""

from session_manager.supervisor.core import Supervisor

__all__ = ["Supervisor"]
