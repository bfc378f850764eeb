"""`run_fl`: a Flower simulation of `clients` clients over `rounds` rounds with the server-side audit.

The server is a Flower `ServerApp` whose main runs `LeakageAudit(strategy).start(...)`, where the
strategy is FedAvg (every client trains every round; no federated evaluation), wrapped for
`central-client-clip` in Flower's `DifferentialPrivacyClientSideFixedClipping` with Flower's RDP
accountant (client-level, add-or-remove-one, no amplification). The clients are gradleak's
`ClientApp` (`gradleak.flower.client`). Flower's Simulation Runtime (`flwr.simulation.run_simulation`,
on Ray) runs them: one CPU per client, at most as many clients at once as the machine has CPUs.

Under `--peft` the server's initial arrays, the clients' messages and the aggregate hold the LoRA
adapters (and a classifier's head) only; the frozen base never travels.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from gradleak.errors import GradleakError
from gradleak.flower.spec import FlSpec, partitions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlResult:
    spec: FlSpec
    leaks: tuple[Any, ...]  # ClientLeak, in the order found
    seconds: float
    store: str | None = None
    errors: tuple[str, ...] = ()
    flwr_version: str = field(default="")
    shared: dict[str, Any] = field(default_factory=dict)  # what every update holds (adapters.shared_summary)

    def rounds(self) -> list[tuple[int, list[Any]]]:
        by: dict[int, list[Any]] = {}
        for leak in self.leaks:
            by.setdefault(leak.round, []).append(leak)
        return [(r, sorted(v, key=lambda x: x.client)) for r, v in sorted(by.items())]

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": [
                {
                    "round": r,
                    "clients": [
                        {
                            "client": leak.client,
                            "scores": leak.scores.as_dict(),
                            "epsilon": leak.epsilon,
                            "aggregate_epsilon": leak.aggregate_epsilon,
                            "references": list(leak.references),
                            "reconstructions": list(leak.reconstructions),
                            "seconds": leak.seconds,
                            "error": leak.error,
                            "notes": list(leak.notes),
                        }
                        for leak in leaks
                    ],
                }
                for r, leaks in self.rounds()
            ],
            "server_sees": self.spec.server_view(),
            "shared": self.shared,
            "flower_dp": self.spec.flower_dp,
            "delta": self.spec.delta,
            "accountant": self.spec.accountant,
            "store": self.store,
            "seconds": self.seconds,
            "errors": list(self.errors),
            "flwr": self.flwr_version,
            "spec": asdict(self.spec),
        }


def flower_version() -> str:
    try:
        return metadata.version("flwr")
    except metadata.PackageNotFoundError:
        return ""


def require_flower() -> None:
    if not flower_version():
        raise GradleakError('gradleak fl needs Flower and Ray: pip install -e ".[fl]"')
    try:
        import ray  # noqa: F401
    except ImportError:
        raise GradleakError('Flower\'s simulation runs on Ray: pip install -e ".[fl]"') from None


def _quiet(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)  # Flower logs every round at INFO; keep stderr for errors


def backend_config(spec: FlSpec, verbose: bool = False) -> dict[str, Any]:
    """One CPU per client; Ray gets at most the machine's CPUs, so at most that many clients train
    at once. Ray's own logs stay in the workers unless verbose."""
    cpus = max(1, min(spec.clients, os.cpu_count() or 1))
    gpus = 1.0 / cpus if spec.device.startswith("cuda") else 0.0
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": gpus},
        "init_args": {
            "num_cpus": cpus,
            "include_dashboard": False,
            "logging_level": "INFO" if verbose else "ERROR",
            "log_to_driver": verbose,
        },
    }


def run_fl(
    spec: FlSpec,
    store: Any = None,
    on_leak: Callable[[Any], None] | None = None,
    verbose: bool | None = None,
) -> FlResult:
    """Run the simulation and the audit; every (round, client) record goes to `store` (a path or a
    `gradleak.store.Store`) as it is found."""
    spec.validate()
    partitions(spec)  # refuses a data set smaller than the clients before anything starts
    require_flower()
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import (
        Grid,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
        ServerApp,
    )
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
    from flwr.simulation import run_simulation

    from gradleak.flower.audit import LeakageAudit
    from gradleak.flower.client import make_client_app, parameters
    from gradleak.victims import load_victim

    if verbose is None:
        verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
    _quiet(verbose)
    start = time.perf_counter()
    victim = load_victim(
        spec.victim, task=spec.task, dtype=spec.dtype, seed=spec.seed, device=spec.device, peft=spec.peft
    )
    initial = ArrayRecord(torch_state_dict=parameters(victim))
    n = spec.clients
    strategy: Any = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=n,
        min_evaluate_nodes=0,
        min_available_nodes=n,
    )
    if spec.flower_dp == "central-client-clip":
        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=spec.delta,
                population_size=n,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=float(spec.dp_noise_multiplier),  # type: ignore[arg-type]
            clipping_norm=float(spec.dp_clip),  # type: ignore[arg-type]
            num_sampled_clients=n,
            accountant=accountant,
        )
    audit = LeakageAudit(
        strategy,
        victim=victim,
        attack=spec.attack,
        store=store,
        local_lr=spec.local_lr,
        local_steps=spec.local_steps,
        batch_size=spec.batch_size,
        options=spec.options(),
        perturbed=spec.perturbed(),
        server_mechanisms=spec.server_mechanisms(),
        delta=spec.delta,
        accountant=spec.accountant,
        seed=spec.seed,
        peft=spec.peft,
        spec=asdict(spec),
        on_leak=on_leak,
    )
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        audit.start(grid=grid, initial_arrays=initial, num_rounds=spec.rounds, train_config=ConfigRecord())

    run_simulation(
        server_app=server,
        client_app=make_client_app(spec),
        num_supernodes=n,
        backend_config=backend_config(spec, verbose),  # type: ignore[arg-type]
        verbose_logging=False,
    )
    if audit.errors:  # returned, not raised: the rounds that ran are results, the CLI exits 1
        log.warning("%d client failure(s); the first: %s", len(audit.errors), audit.errors[0])
    store_path = None if store is None else str(getattr(store, "path", store))
    return FlResult(
        spec=spec,
        leaks=tuple(audit.leaks),
        seconds=time.perf_counter() - start,
        store=store_path,
        errors=tuple(audit.errors),
        flwr_version=flower_version(),
        shared=audit.shared,
    )
