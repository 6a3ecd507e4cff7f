"""``govshare query sql --scheme``: the intersection aggregate's encryption, as a real subprocess
against real nodes; bfv-simd by default, paillier on request, anything else refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PURPOSE, FederationFixture, PsiData, grant

from govshare.model.governance import QueryKind

TIMEOUT = 300  # a subprocess waits for real nodes on a shared, sometimes slow machine
# The whole intersection (84 keys in the session's data), far above the smallest releasable
# group: with a filter to tax's high incomes (7 keys) the noisy count fell under k at random
# and the group was suppressed.
SQL = (
    "SELECT COUNT(*), SUM(a.amount) FROM civil.assistance a "
    "JOIN tax.residents t ON a.id_number = t.id_number"
)


def _sql(fed: FederationFixture, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "govshare.cli", "query", "sql", "--identity",
         str(fed.bundles["alice"]), "--purpose", PURPOSE, "--epsilon", "1", "--sum-bound",
         "30000", "--json", *extra, SQL],
        cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "scheme"), [((), "bfv-simd"), (("--scheme", "paillier"), "paillier")]
)
def test_query_sql_runs_the_chosen_scheme(
    fed: FederationFixture, psi_data: PsiData, tmp_path: Path, extra: tuple[str, ...], scheme: str
) -> None:
    kinds = [QueryKind.INTERSECTION_AGGREGATE]
    grant(psi_data.civil, "assistance", "alice", ["id_number", "amount"], kinds)
    grant(psi_data.tax, "residents", "alice", ["id_number", "income_band"], kinds)
    ran = _sql(fed, tmp_path, *extra)
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result["scheme"] == scheme and result["kind"] == "intersection_aggregate"
    ((group,),) = [result["groups"]]
    assert group["count"]["value"] is not None and group["count"]["noise_scale"] == "2"


def test_query_sql_refuses_an_unknown_scheme(fed: FederationFixture, tmp_path: Path) -> None:
    ran = _sql(fed, tmp_path, "--scheme", "ckks")
    assert ran.returncode == 2 and "'ckks' is not one of" in ran.stderr
