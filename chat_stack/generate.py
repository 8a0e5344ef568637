"""Deterministic fake chat content: names, Korean/English/emoji text, attachment bytes.

Every function draws only from the ``random.Random`` it is given (or a seed), so the same seed
always yields the same values.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

# fmt: off
KOREAN_WORDS = (
    "안녕하세요", "오늘", "회의", "점심", "뭐", "먹을까요", "ㅋㅋㅋ", "좋아요", "감사합니다",
    "내일", "배포", "서버", "확인했습니다", "잠깐만요", "네", "아니요", "사진", "보내드릴게요",
    "퇴근", "커피", "한잔", "어때요", "진짜", "대박", "수고하셨습니다", "주말", "일정", "공유",
    "부탁드립니다", "지금", "가능하세요", "장애", "해결됐어요", "ㅎㅎ", "금요일", "회식",
)
ENGLISH_WORDS = (
    "hello", "meeting", "deploy", "lunch", "today", "thanks", "the", "build", "is", "green",
    "PR", "review", "please", "ok", "lgtm", "tomorrow", "coffee", "server", "down", "again",
    "fixed", "ship", "it", "weekend", "plans", "what", "about", "you", "sounds", "good",
    "release", "notes", "on-call", "standup", "in", "5", "min", "sorry", "late", "nice",
)
EMOJI = (
    "😀", "👍", "🎉", "🙏", "🔥", "❤️", "😂", "🚀", "☕", "👀", "🥲", "✅", "🍜", "🐛",
    "👨\u200d👩\u200d👧", "🇰🇷", "💯", "🙌",
)
KOREAN_SURNAMES = (
    "김", "이", "박", "최", "정", "강", "조", "윤", "장", "임", "한", "오",
)
KOREAN_GIVEN = (
    "민준", "서연", "도윤", "하은", "지호", "수아", "예준", "지우", "서준", "하린",
)
ENGLISH_GIVEN = (
    "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan",
)
ENGLISH_SURNAMES = (
    "Kim", "Lee", "Park", "Smith", "Jones", "Choi", "Brown", "Jung",
)
HANDLES = (
    "minjun", "seoyeon", "alice", "bob", "coder", "cat", "hiker", "dev", "jiwoo", "ops",
)
ROOM_TOPICS = (
    "개발팀", "디자인 리뷰", "점심 메이트", "Weekend hikers", "Book club 📚", "프로젝트 알파",
    "infra-oncall", "가족 👨\u200d👩\u200d👧", "동기 모임", "Gaming night 🎮", "마케팅",
    "Release train 🚀",
)
FILE_STEMS = (
    "회의록", "스크린샷", "사진", "보고서_최종", "견적서", "발표자료", "IMG", "screenshot",
    "invoice", "report final", "여행 사진", "contract",
)
# fmt: on


@dataclass(frozen=True)
class FileType:
    """A kind of attachment: MIME type, file extension and leading magic bytes."""

    content_type: str
    extension: str
    magic: bytes


FILE_TYPES = (
    FileType("image/jpeg", ".jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"),
    FileType("image/png", ".png", b"\x89PNG\r\n\x1a\n"),
    FileType("application/pdf", ".pdf", b"%PDF-1.7\n"),
    FileType("video/mp4", ".mp4", b"\x00\x00\x00\x18ftypmp42"),
    FileType("application/zip", ".zip", b"PK\x03\x04"),
    FileType(
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        ".docx",
        b"PK\x03\x04",
    ),
)


def display_name(rng: random.Random) -> str:
    """A Korean or English person's name, sometimes with an emoji."""
    if rng.random() < 0.6:
        name = rng.choice(KOREAN_SURNAMES) + rng.choice(KOREAN_GIVEN)
    else:
        name = f"{rng.choice(ENGLISH_GIVEN)} {rng.choice(ENGLISH_SURNAMES)}"
    if rng.random() < 0.15:
        name += f" {rng.choice(EMOJI)}"
    return name


def username(rng: random.Random, user_id: int) -> str:
    """A unique lower-case login name for ``user_id``."""
    return f"{rng.choice(HANDLES)}{user_id}"


def room_name(rng: random.Random, room_id: int) -> str:
    """A group room's name."""
    return f"{rng.choice(ROOM_TOPICS)} #{room_id}"


def message_text(rng: random.Random) -> str:
    """A short chat message in Korean, English or both, with emoji and sometimes two lines."""
    words = 1 + min(int(rng.expovariate(1 / 6)), 39)
    flavour = rng.random()
    if flavour < 0.5:
        vocabulary: tuple[str, ...] = KOREAN_WORDS
    elif flavour < 0.85:
        vocabulary = ENGLISH_WORDS
    else:
        vocabulary = KOREAN_WORDS + ENGLISH_WORDS
    text = " ".join(rng.choices(vocabulary, k=words))
    if rng.random() < 0.3:
        text += " " + "".join(rng.choices(EMOJI, k=rng.randint(1, 3)))
    if rng.random() < 0.03:
        text += "\n" + " ".join(rng.choices(vocabulary, k=rng.randint(1, 6)))
    return text


def file_name(rng: random.Random, file_type: FileType) -> str:
    """An original file name (often Korean) with the type's extension."""
    return f"{rng.choice(FILE_STEMS)} {rng.randint(1, 9999)}{file_type.extension}"


def log_uniform_size(rng: random.Random, low: int, high: int) -> int:
    """A size between ``low`` and ``high`` bytes, uniform on a log scale (many small ones)."""
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


def attachment_bytes(seed: int, attachment_id: int, size: int, file_type: FileType) -> bytes:
    """The deterministic content of one attachment: the type's magic, then seeded bytes."""
    head = file_type.magic[:size]
    body = random.Random(f"{seed}:object:{attachment_id}").randbytes(size - len(head))
    return head + body


def sha256_hex(data: bytes) -> str:
    """The lower-case hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()
