"""Hypothesis state machines (the KV and records models) run against a real gateway."""

from __future__ import annotations

import grpc

__all__ = ["run_model_at_gateway"]


def run_model_at_gateway(
    model: type, stub_class: type, gateway: str, api_key: str, *, max_examples: int, steps: int
) -> None:
    """Run hypothesis state machine ``model`` against ``gateway`` (blocking: call it in a thread).

    The machine reaches the service through ``stub``, a ``stub_class`` on a
    sync channel, and sends ``metadata`` (the key's bearer header).
    """
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    with grpc.insecure_channel(gateway) as channel:
        machine = type(
            f"{model.__name__}AtGateway",
            (model,),
            {"stub": stub_class(channel), "metadata": (("authorization", f"Bearer {api_key}"),)},
        )
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=max_examples,
                stateful_step_count=steps,
                deadline=None,
                database=None,  # nothing written into the work tree
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
