"""The demo generator (`services.cli.demo_data`), without a broker: valid identifiers, numbers
that add up, notices that cover the people, deterministic ids."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import date
from uuid import UUID

import pytest

from contracts import identifiers
from contracts.base import model_for
from contracts.codes import LeaderPost, category_allowed
from services.cli import demo_data
from services.cli.demo_data import Actor, DemoPlan, build_plan, envelopes, stages

AS_OF = date(2026, 11, 25)
ACTOR = Actor("bianzhi-demo", "130000", "approver")


@pytest.fixture(scope="module")
def hebei() -> DemoPlan:
    """The default demo: all of Hebei and 20,000 people."""
    return build_plan(seed=7, as_of=AS_OF)


def test_hebei_is_the_province_its_eleven_cities_and_every_county(hebei: DemoPlan) -> None:
    divisions = {o.division.code for o in hebei.orgs}
    by_level = Counter(identifiers.division(code).level for code in divisions)  # type: ignore[union-attr]
    assert by_level[1] == 1 and by_level[2] == 11
    assert "130000" in divisions and "130100" in divisions and "131100" in divisions
    assert by_level[3] == len(demo_data.counties_within("130000")) > 100
    assert len(hebei.people) == demo_data.DEFAULT_PEOPLE
    names = {o.command.name for o in hebei.orgs}
    assert {"河北省财政厅", "石家庄市教育局", "石家庄市长安区人民医院", "正定县财政局"} <= names
    assert len(names) == len(hebei.orgs)  # no two orgs share a name


def test_orgs_have_valid_unique_usccs_and_parents_registered_before_them(hebei: DemoPlan) -> None:
    usccs = [o.command.uscc for o in hebei.orgs]
    assert len(set(usccs)) == len(usccs)
    for org in hebei.orgs:
        assert org.command.uscc is not None
        assert identifiers.validate_uscc(org.command.uscc) == org.command.uscc
        assert identifiers.uscc_kind_warning(org.command.uscc, org.command.kind) is None
        assert org.command.uscc[2:8] == org.command.division_code
    organs = {c.org_id: c for _, c in stages(hebei)[1].commands}
    for _, institution in stages(hebei)[2].commands:
        parent = organs[institution.parent_org_id]  # type: ignore[attr-defined]
        assert parent.division_code == institution.division_code  # type: ignore[attr-defined]


def test_people_have_valid_unique_citizen_ids_from_their_orgs_division(hebei: DemoPlan) -> None:
    division_of = {o.command.org_id: o.command.division_code for o in hebei.orgs}
    ids = [p.citizen_id for p in hebei.people]
    assert len(set(ids)) == len(ids)
    assert len({p.person_id for p in hebei.people}) == len(ids)
    for person in hebei.people:
        assert identifiers.validate_citizen_id(person.citizen_id) == person.citizen_id
        assert identifiers.is_within(person.citizen_id[:6], division_of[person.org_id])
        assert identifiers.citizen_sex(person.citizen_id) == person.sex
        born = identifiers.citizen_birth_date(person.citizen_id)
        assert born == person.birth_date
        age = (date(AS_OF.year, 1, 1) - born).days / 365.25
        assert demo_data.ENTRY_AGE <= age < demo_data.RETIREMENT_AGE + 1
        assert 2 <= len(person.name) <= 4
        assert person.effective_date <= AS_OF
    sexes = Counter(p.sex for p in hebei.people)
    assert 0.4 < sexes["female"] / len(ids) < 0.6


def test_quota_notices_and_leader_posts_cover_the_people(hebei: DemoPlan) -> None:
    kind_of = {o.command.org_id: o.command.kind for o in hebei.orgs}
    approved = {(q.org_id, q.category): q.approved for q in hebei.quotas}
    assert len(approved) == len(hebei.quotas)  # one approval per org and category
    for org_id, category in approved:
        assert category_allowed(kind_of[org_id], category)
    notices = {n.notice_no: n for n in hebei.notices}
    assert len(notices) == len(hebei.notices)
    on_notice: Counter[str] = Counter()
    held: Counter[tuple[UUID, str]] = Counter()
    for person in hebei.people:
        notice = notices[person.notice_no]
        assert (notice.org_id, notice.category) == (person.org_id, person.category)
        assert notice.document.date <= person.effective_date <= notice.valid_until
        on_notice[person.notice_no] += 1
        held[(person.org_id, person.category)] += 1
    assert all(on_notice[no] == n.count for no, n in notices.items())  # exactly covered
    reserved: Counter[tuple[UUID, str]] = Counter()
    for notice in hebei.notices:
        assert notice.valid_until > AS_OF
        reserved[(notice.org_id, notice.category)] += notice.count
    for key, count in reserved.items():
        assert count <= approved[key]  # a notice reserves vacant places only
    assert all(held[key] < approved[key] for key in held)  # and some stay vacant

    posts = {p.org_id: p for p in hebei.leader_posts}
    leaders: dict[UUID, Counter[LeaderPost]] = defaultdict(Counter)
    for person in hebei.people:
        if person.leader_post is not None:
            leaders[person.org_id][person.leader_post] += 1
    assert leaders  # the demo has leaders
    for org_id, count in leaders.items():
        assert count[LeaderPost.PRINCIPAL] <= posts[org_id].principal
        assert count[LeaderPost.DEPUTY] <= posts[org_id].deputy


def test_region_limits_cover_what_is_approved_and_nest(hebei: DemoPlan) -> None:
    division_of = {o.command.org_id: o.command.division_code for o in hebei.orgs}
    limits = {(lim.division_code, lim.category): lim.limit for lim in hebei.limits}
    used: Counter[tuple[str, str]] = Counter()
    for quota in hebei.quotas:
        code = division_of[quota.org_id]
        for region in [code, *identifiers.ancestors(code)]:
            used[(region, quota.category)] += quota.approved
    assert set(limits) == set(used)
    for key, total in used.items():
        assert total <= limits[key]
    for (code, category), limit in limits.items():
        for parent in identifiers.ancestors(code):
            assert limit <= limits[(parent, category)]


def test_stages_go_in_dependency_order_with_unique_ids_and_valid_envelopes(
    hebei: DemoPlan,
) -> None:
    names = [s.name for s in stages(hebei)]
    assert names == ["limits", "organs", "institutions", "quota", "notices", "people"]
    seen: set[str] = set()
    for stage in stages(hebei):
        for env in envelopes(hebei, stage, ACTOR, "/cli/demo"):
            assert env.id not in seen
            seen.add(env.id)
            model = model_for(env.type)
            assert model is not None
            model.model_validate(env.data)  # the contract accepts every command
            assert env.actorregion == "130000" and env.actorroles == "approver"
            assert env.subject
    assert len(seen) == sum(len(s.commands) for s in stages(hebei))


def test_the_same_seed_gives_the_same_commands_and_another_seed_others() -> None:
    def wire(plan: DemoPlan) -> list[tuple[str, dict[str, object]]]:
        return [
            (env.id, env.data)
            for stage in stages(plan)
            for env in envelopes(plan, stage, ACTOR, "/cli/demo")
        ]

    one = build_plan(200, seed=3, within="130100", as_of=AS_OF)
    two = build_plan(200, seed=3, within="130100", as_of=AS_OF)
    other = build_plan(200, seed=4, within="130100", as_of=AS_OF)
    assert wire(one) == wire(two)
    assert [p.citizen_id for p in one.people] != [p.citizen_id for p in other.people]
    assert {e for e, _ in wire(one)}.isdisjoint({e for e, _ in wire(other)})


def test_another_day_of_the_same_year_gives_the_same_people_and_command_ids() -> None:
    def ids(plan: DemoPlan) -> list[str]:
        return [e.id for s in stages(plan) for e in envelopes(plan, s, ACTOR, "/cli/demo")]

    today = build_plan(300, seed=2, within="130100", as_of=AS_OF)
    earlier = build_plan(300, seed=2, within="130100", as_of=date(2026, 3, 2))
    assert [p.citizen_id for p in today.people] == [p.citizen_id for p in earlier.people]
    assert ids(today) == ids(earlier)


def test_a_county_scope_loads_only_that_county() -> None:
    plan = build_plan(40, seed=1, within="130127", as_of=AS_OF)
    assert {o.command.division_code for o in plan.orgs} == {"130127"}
    assert len(plan.orgs) == len(demo_data.CATALOGUE)
    assert {lim.division_code for lim in plan.limits} == {"130127"}
    assert len(plan.people) == 40
    assert all(p.citizen_id.startswith("130127") for p in plan.people)
    assert all(o.command.name.startswith("高邑县") for o in plan.orgs)


def test_no_people_still_gives_orgs_and_quota_and_bad_scopes_are_refused() -> None:
    plan = build_plan(0, seed=1, within="130127", as_of=AS_OF)
    assert plan.people == [] and plan.notices == []
    assert plan.orgs and plan.quotas and plan.limits
    with pytest.raises(ValueError, match="not a current"):
        build_plan(10, seed=1, within="999999", as_of=AS_OF)
    with pytest.raises(ValueError, match="negative"):
        build_plan(-1, seed=1, as_of=AS_OF)


def test_generated_usccs_agree_with_the_contract_validator() -> None:
    for body in ("00000000", "12345678", "40991234", "09999999"):
        code = demo_data.uscc(demo_data.OrgKind.ORGAN, "130102", body)
        assert identifiers.validate_uscc(code) == code
