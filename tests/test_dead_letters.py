"""require_uuids: what the tables' uuid columns take passes, anything else is refused naming its field."""
from __future__ import annotations

import uuid

import pytest

from alerting_app.dead_letters import UndecodableMessage, require_uuids


@pytest.mark.parametrize("form", [str, lambda u: str(u).upper(), lambda u: u.hex, lambda u: "{%s}" % u])
def test_every_form_of_a_uuid_passes(form):
    require_uuids(client_id=[form(uuid.uuid4())])


@pytest.mark.parametrize("value", ["", "not-a-uuid", str(uuid.uuid4())[:-1], str(uuid.uuid4()) + "0",
                                   "g" + str(uuid.uuid4())[1:]])
def test_anything_else_is_refused_naming_the_field(value):
    with pytest.raises(UndecodableMessage, match=r"^rule_ids: not a UUID"):
        require_uuids(client_id=[str(uuid.uuid4())], rule_ids=[str(uuid.uuid4()), value])
