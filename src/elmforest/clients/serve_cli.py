"""`elmforest serve`: an OpenAI-compatible HTTP server for a forest or one checkpoint."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from elmforest.utils.argtypes import given_by_user, opt, positive_float, positive_int, verb
from elmforest.utils.errors import UserError
from elmforest.utils.typed import split_list


def register(app: typer.Typer) -> None:
    verb(app)(serve)


def port_number(s):
    if isinstance(s, int):
        return s
    v = positive_int(s) if str(s).strip() != "0" else 0
    if v > 65535:
        raise typer.BadParameter(f"a port is at most 65535, got {v}")
    return v


port_number.metavar = "N"


def serve(
    forest: Annotated[
        str | None, opt("a forest directory, or any single checkpoint or run directory", metavar="DIR")
    ] = None,
    model: Annotated[
        str | None, opt("the same as --forest (for one checkpoint or run directory)", metavar="DIR")
    ] = None,
    mode: Annotated[
        Literal["ensemble", "topk", "cluster", "average"],
        opt(
            "ensemble: every expert, Bayes-weighted; topk: the k of the largest prior; cluster: c-BTM, the "
            "k nearest clusters of each request's context; average: the prior-weighted parameter average"
        ),
    ] = "ensemble",
    k: Annotated[int, opt("experts per request for --mode topk and cluster", positive_int)] = 2,
    prior: Annotated[
        Literal["uniform", "cached"], opt("the prior over experts (cached: needs --prior-data)")
    ] = "uniform",
    prior_data: Annotated[
        str | None,
        opt("shards or raw data whose valid split gives the cached prior", metavar="PATH"),
    ] = None,
    weighting: Annotated[
        Literal["posterior", "fixed"],
        opt("posterior: the weights follow the text so far (Bayes); fixed: the prior throughout"),
    ] = "posterior",
    experts: Annotated[str | None, opt("serve only these experts", metavar="A,B,...")] = None,
    name: Annotated[
        str | None, opt("the model id clients ask for (default: the directory's name)", metavar="ID")
    ] = None,
    host: Annotated[str, opt("the address to listen on", metavar="HOST")] = "127.0.0.1",
    port: Annotated[int, opt("the port to listen on (0: any free one)", port_number)] = 8000,
    max_active: Annotated[
        int, opt("requests decoded together, a step each in turn; the rest wait in order", positive_int)
    ] = 8,
    seq_len: Annotated[
        int | None, opt("the context window (default: the model's training context)", positive_int)
    ] = None,
    routing_temperature: Annotated[
        float, opt("--mode cluster: T in exp(-distance^2 / T)", positive_float)
    ] = 0.1,
    device: Annotated[str, opt("auto | cpu | cuda | cuda:N", metavar="DEVICE")] = "auto",
    precision: Annotated[
        str, opt("auto (bf16 where the hardware runs it) | bf16 | fp32", metavar="P")
    ] = "auto",
) -> None:
    """Serve a forest (or one checkpoint) over an OpenAI-compatible HTTP API (/v1/completions)."""
    if bool(forest) == bool(model):
        raise UserError("serve takes either --forest or --model (a forest or checkpoint directory)")
    try:
        from elmforest.clients.server import bind
        from elmforest.clients.server import serve as run
    except ImportError as e:
        raise UserError(f"serving needs the serve extra: pip install 'elmforest[serve]' ({e})") from None
    from elmforest.forest.lm import open_lm

    experts_ = split_list(experts, "--experts")
    if port:  # a port in use is said now, not after the models load; it is bound for good only once
        bind(host, port).close()  # they have loaded, so no client connects to a server that cannot answer
    lm = open_lm(
        forest or model,
        mode,
        k,
        prior,
        prior_data,
        weighting,
        experts_,
        device,
        precision,
        seq_len,
        routing_temperature,
        given=[n for n in ("k", "weighting", "routing_temperature", "prior") if given_by_user(n)],
    )
    run(lm, host, port, name, max_active)
