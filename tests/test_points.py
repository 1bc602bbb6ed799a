"""Molmo2's point strings: the spec's literal examples (MOLMO2_SPEC.md section 10), format -> parse round
trips on random point sets, and a parser that never raises on malformed text."""

import random
from collections import Counter

import pytest

import data


# --- the spec's literal strings ---------------------------------------------------------------------

def test_image_points_match_spec_literal():
    # given out of order: the formatter sorts by x then y
    tag = data.image_points_tag([(0.911, 0.8), (0.9, 0.4)], "label")
    assert tag == '<points coords="1 1 900 400 2 911 800">label</points>'
    assert data.pointing_answer(tag, 2, with_count=True) == (
        'Counting the <points coords="1 1 900 400 2 911 800">label</points> shows a total of 2.')
    assert data.pointing_answer(tag, 2) == tag
    assert data.pointing_answer("", 0, with_count=True) == "There are none."


def test_video_points_and_tracks_match_spec_literal():
    tag = data.video_points_tag([0.2, 0.1], [[(0.9, 0.4)], [(0.911, 0.8)]], "label")
    assert tag == '<points coords="0.1 1 911 800;0.2 2 900 400">label</points>'
    tracks = data.video_tracks_tag([(1.0, {"cat": (0.138, 0.427)}), (0.0, {"cat": (0.259, 0.34)})], "label")
    assert tracks == '<tracks coords="0.0 1 259 340;1.0 1 138 427">label</tracks>'


def test_tab_and_semicolon_group_forms_and_alt():
    per_image = [[(0.5, 0.5)], [], [(0.25, 0.75), (0.1, 0.2)]]
    sft = data.multi_image_points_tag(per_image, "dogs")
    pretrain = data.multi_image_points_tag(per_image, "dogs", sep="\t")
    # ids run on across images; an image without points has no group
    assert sft == '<points coords="1 1 500 500;3 2 100 200 3 250 750">dogs</points>'
    assert pretrain == sft.replace(";", "\t")
    with_alt = data.image_points_tag([(0.0, 1.0)], "a dog", alt="the brown dog")
    assert with_alt == '<points alt="the brown dog" coords="1 1 000 1000">a dog</points>'
    for text in (sft, pretrain):
        parsed = data.parse_points(text)
        assert parsed.dropped == []
        assert [(p.frame, p.id, p.x, p.y) for p in parsed.points] == [
            (1, 1, 0.5, 0.5), (3, 2, 0.1, 0.2), (3, 3, 0.25, 0.75)]
    parsed = data.parse_points(with_alt)
    assert parsed.tags[0].alt == "the brown dog" and parsed.tags[0].label == "a dog"
    with pytest.raises(ValueError, match="separator"):
        data.multi_image_points_tag(per_image, "dogs", sep=",")


def test_track_ids_follow_first_appearance_in_xy_order():
    # at t=0 'b' is left of 'a', so 'b' becomes 1; 'c' first appears at t=0.5 and becomes 3
    frames = [(0.0, {"a": (0.6, 0.1), "b": (0.2, 0.9)}), (0.5, {"c": (0.0, 0.0), "a": (0.7, 0.1)})]
    assert data.video_tracks_tag(frames, "shapes") == (
        '<tracks coords="0.0 1 200 900 2 600 100;0.5 2 700 100 3 000 000">shapes</tracks>')


def test_parse_reads_spec_strings():
    parsed = data.parse_points("Counting the <points coords=\"1 1 900 400 2 911 800\">label</points> shows a total of 2.")
    assert parsed.count == 2 and parsed.dropped == []
    assert parsed.tags[0].label == "label" and parsed.tags[0].kind == "points"
    assert [(p.frame, p.id, p.x, p.y) for p in parsed.points] == [(1, 1, 0.9, 0.4), (1, 2, 0.911, 0.8)]
    parsed = data.parse_points('<points coords="0.1 1 911 800;0.2 2 900 400">label</points>')
    assert [(p.frame, p.id) for p in parsed.points] == [(0.1, 1), (0.2, 2)]
    assert isinstance(parsed.points[0].frame, float)
    parsed = data.parse_points('<tracks coords="0.0 1 259 340;1.0 1 138 427">label</tracks>')
    assert parsed.tags[0].kind == "tracks" and [p.id for p in parsed.points] == [1, 1]
    assert data.parse_points("There are none.").count == 0
    assert data.parse_points("a red square").count is None


# --- round trips ------------------------------------------------------------------------------------

def _rounded(x, y):
    return round(min(max(x, 0), 1) * 1000) / 1000, round(min(max(y, 0), 1) * 1000) / 1000


def _random_points(rng, n):
    # mostly inside, a few just outside the image (clamped by the formatter)
    return [(rng.uniform(-0.05, 1.05), rng.uniform(-0.05, 1.05)) for _ in range(n)]


def test_round_trip_image_and_multi_image():
    rng = random.Random(0)
    for trial in range(300):
        n_images = rng.randint(1, 5)
        per_image = [_random_points(rng, rng.randint(0, 8)) for _ in range(n_images)]
        sep = rng.choice([";", "\t"])
        tag = data.multi_image_points_tag(per_image, "thing", sep=sep)
        total = sum(len(p) for p in per_image)
        answer = data.pointing_answer(tag, total, with_count=trial % 2 == 0)
        parsed = data.parse_points(answer)
        assert parsed.dropped == []
        if total == 0:
            assert answer == "There are none." and parsed.count == 0
            continue
        assert parsed.count == (total if trial % 2 == 0 else None)
        got = Counter((p.frame, p.x, p.y) for p in parsed.points)
        want = Counter((i, *_rounded(x, y)) for i, pts in enumerate(per_image, 1) for x, y in pts)
        assert got == want
        assert [p.id for p in parsed.points] == list(range(1, total + 1))


def test_round_trip_video_points_and_tracks():
    rng = random.Random(1)
    for _ in range(200):
        n_frames = rng.randint(1, 10)
        times = [0.5 * i for i in range(n_frames)]
        per_frame = [_random_points(rng, rng.randint(0, 4)) for _ in range(n_frames)]
        per_frame[0].append((0.5, 0.5))  # at least one point (no points at all is "There are none.")
        parsed = data.parse_points(data.video_points_tag(times, per_frame, "ball"))
        assert parsed.dropped == []
        assert Counter((p.frame, p.x, p.y) for p in parsed.points) == Counter(
            (round(t, 1), *_rounded(x, y)) for t, pts in zip(times, per_frame) for x, y in pts)

        objects = [f"obj{k}" for k in range(rng.randint(1, 5))]
        frames = [(t, {o: (rng.random(), rng.random()) for o in objects if rng.random() < 0.8}) for t in times]
        frames[0][1][objects[0]] = (0.5, 0.5)
        parsed = data.parse_points(data.video_tracks_tag(frames, "balls", sep=rng.choice([";", "\t"])))
        assert parsed.dropped == []
        # each object keeps one id through the video: the id -> object map is a bijection
        id_to_object = {}
        for p in parsed.points:
            t = p.frame
            matches = [o for o, xy in dict(frames)[t].items() if _rounded(*xy) == (p.x, p.y)]
            assert matches, (t, p)
            id_to_object.setdefault(p.id, set()).update(matches)
        assert len(parsed.points) == sum(len(objs) for _, objs in frames)
        assert len({p.id for p in parsed.points}) == len({o for _, objs in frames for o in objs})


# --- fuzzing: malformed text never raises -----------------------------------------------------------

_FRAGMENTS = ['<points', '<tracks', ' coords="', '"', '>', '</points>', '</tracks>', '/>', ' alt="', ';', '\t',
              ' ', '1', '0.5', '999', '1000', '12345678901234567890', '-3', '1e9', 'nan', '.', 'label', '<',
              'shows a total of ', 'There are none.', '\n', 'é', '\x00', '=', 'coords=', '9' * 5000]


def test_fuzzed_malformed_strings_never_raise():
    rng = random.Random(2)
    valid = [
        'Counting the <points coords="1 1 900 400 2 911 800">label</points> shows a total of 2.',
        '<points coords="0.1 1 911 800;0.2 2 900 400">label</points>',
        '<tracks alt="x" coords="0.0 1 259 340\t1.0 1 138 427">label</tracks>',
    ]
    n_dropped = 0
    for trial in range(3000):
        if trial % 2:
            text = "".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(0, 30)))
        else:  # mutate a valid string: delete, duplicate or insert characters
            chars = list(rng.choice(valid))
            for _ in range(rng.randint(1, 8)):
                k = rng.randrange(len(chars) + 1)
                op = rng.random()
                if op < 0.4 and chars:
                    del chars[min(k, len(chars) - 1)]
                elif op < 0.7:
                    chars.insert(k, rng.choice(_FRAGMENTS))
                else:
                    chars.insert(k, chr(rng.randrange(32, 0x250)))
            text = "".join(chars)
        parsed = data.parse_points(text)
        n_dropped += bool(parsed.dropped)
        for p in parsed.points:
            assert 0 <= p.x <= 1 and 0 <= p.y <= 1
    assert n_dropped > 500  # the fuzzer does reach the error paths
    for junk in (None, 42, b"<points>", ["<points coords='1 1 1 1'>"]):
        assert data.parse_points(junk).dropped


def test_parser_reports_what_it_dropped():
    parsed = data.parse_points('<points coords="1 1 500 500 2 1500 20 3 7;x 4 1 1">dots')
    assert [(p.frame, p.id) for p in parsed.points] == [(1, 1)]
    reasons = " | ".join(parsed.dropped)
    for expected in ("no </points>", "outside 0..1000", "trailing value", "not an image index or a time"):
        assert expected in reasons
    assert parsed.tags[0].label == "dots"
    assert data.parse_points('<points label="x">y</points>').dropped == ["<points> #1: no coords attribute"]
