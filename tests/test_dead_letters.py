"""require_uuids: what the tables' uuid columns take passes, anything else is refused naming its field."""
from __future__ import annotations

import uuid

import pytest

from alerting_app.dead_letters import UndecodableMessage, require_uuids


def test_the_canonical_form_of_a_uuid_passes():
    require_uuids(client_id=[str(uuid.uuid4())])


@pytest.mark.parametrize("form", [lambda u: str(u).upper(), lambda u: u.hex, lambda u: "{%s}" % u, lambda u: u.urn])
def test_other_forms_python_reads_are_refused_as_the_tables_would_not_join_them(form):
    # asyncpg refuses `{...}` and `urn:uuid:...` inside a batch's statement; an upper-case id would
    # not equal the stored text form it is compared with.
    with pytest.raises(UndecodableMessage, match=r"^client_id: not a UUID in canonical form"):
        require_uuids(client_id=[form(uuid.uuid4())])


# A fixed UUID, not a random one: each pytest-xdist process collects the tests, and their names must agree.
_A_UUID = "3f2b8c1e-5d4a-4e6f-9a7b-2c1d0e9f8a7b"


@pytest.mark.parametrize("value", ["", "not-a-uuid", _A_UUID[:-1], _A_UUID + "0", "g" + _A_UUID[1:]])
def test_anything_else_is_refused_naming_the_field(value):
    with pytest.raises(UndecodableMessage, match=r"^rule_ids: not a UUID"):
        require_uuids(client_id=[str(uuid.uuid4())], rule_ids=[str(uuid.uuid4()), value])
