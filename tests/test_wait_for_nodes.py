"""The ServerApp's node count check: wait until the federation has exactly num_clients nodes."""

import pytest

from fedpt.errors import FedPTError
from fedpt.federation.server_app import wait_for_nodes


class ListedNodes:
    """A Grid stand-in whose connected nodes change from one query to the next."""

    def __init__(self, *answers: list[int]) -> None:
        self.answers, self.calls = list(answers), 0

    def get_node_ids(self) -> list[int]:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return answer


def test_a_node_that_stopped_is_waited_out_until_the_count_matches():
    grid = ListedNodes([1, 2, 3], [1, 2, 3], [1, 3])  # node 2 stopped; its heartbeats lapse
    assert wait_for_nodes(grid, 2, timeout=60, poll=0) == [1, 3]
    assert grid.calls == 3


def test_late_nodes_are_waited_for():
    assert wait_for_nodes(ListedNodes([], [4], [4, 5]), 2, timeout=60, poll=0) == [4, 5]


@pytest.mark.parametrize("nodes", [[1], [1, 2, 3]])
def test_a_count_that_stays_wrong_is_one_line_naming_both_numbers(nodes):
    with pytest.raises(FedPTError) as error:
        wait_for_nodes(ListedNodes(nodes), 2, timeout=0, poll=0)
    message = str(error.value)
    assert f"has {len(nodes)} connected" in message and "num_clients = 2" in message and "\n" not in message
