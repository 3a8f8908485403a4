"""Which languages the multilingual corpus has, where each one's text comes from, and how to
recognise it (script, stopwords, legacy encodings).

Sources are Debian packages only: the man-pages translation project (``manpages-<lang>``,
po4a-generated, one page per document) and translated fortune files (``fortunes-<lang>``). The
stopword lists are short on purpose: they are only used to tell the language from English
leaking through untranslated paragraphs, not to identify languages in general. A list must
contain the language's common words that are also English stopwords (German "an", "was", Dutch
"is", Romanian "are", ...): words in both lists then count for neither, so they cannot make a
paragraph look English.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    kind: str  # "man" (translated manual pages) or "fortune"
    package: str
    globs: tuple[str, ...] = ()  # fortune files, relative to the unpacked package


@dataclass(frozen=True)
class Language:
    code: str  # ISO 639-3
    name: str
    script: str  # human-readable label for the report
    scripts: tuple[str, ...]  # keys of multilingual_text.SCRIPT_RANGES the letters must be in
    sources: tuple[Source, ...]
    stopwords: frozenset[str] = field(default_factory=frozenset)
    encodings: tuple[str, ...] = ("latin-1",)  # legacy fallbacks after UTF-8


def _sw(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _man(pkg: str) -> Source:
    return Source("man", pkg)


def _fortune(pkg: str, *globs: str) -> Source:
    return Source("fortune", pkg, globs or ("usr/share/games/fortunes/*/*",))


LATIN, CYRILLIC = ("Latin",), ("Cyrillic",)
CYR_ENC = ("koi8-r", "cp1251")
CE_ENC = ("iso-8859-2", "cp1250")

LANGUAGES: tuple[Language, ...] = (
    Language(
        "deu", "German", "Latin", LATIN, (_man("manpages-de"), _fortune("fortunes-de")),
        _sw("der die das und ist nicht ein eine einen dem den des zu mit auf für von sich werden wird "
            "an will also was wenn auch oder bei nach wie sind kann diese dieser dass wurde im zum zur aus über nur noch"),
    ),
    Language(
        "fra", "French", "Latin", LATIN, (_man("manpages-fr"),),
        _sw("le la les de des du un une et est sont pour dans que qui pas ne sur par avec ce cette "
            "ces il elle au aux se sa son ses être peut plus été ou si lorsque fichier"),
    ),
    Language(
        "spa", "Spanish", "Latin", LATIN, (_man("manpages-es"), _fortune("fortunes-es", "usr/share/games/fortunes/es/*")),
        _sw("el la los las de del y en es que un una por para con se no su sus al lo como más o "
            "este esta si cuando son puede ser ha sobre entre pero"),
    ),
    Language(
        "ita", "Italian", "Latin", LATIN, (_man("manpages-it"), _fortune("fortunes-it")),
        _sw("il lo la i gli le di del della dei delle e è che un una per con non si in al alla da "
            "sono come più questo questa se ma anche ed ha nel nella viene essere"),
    ),
    Language(
        "por", "Portuguese (Brazil)", "Latin", LATIN,
        (_man("manpages-pt-br"), _fortune("fortunes-br", "usr/share/games/fortunes/brasil")),
        _sw("o a os as de do da dos das e é que um uma para com não se em no na por ao como mais "
            "ser são pode este esta isso quando mas foi ele ela você"),
    ),
    Language(
        "nld", "Dutch", "Latin", LATIN, (_man("manpages-nl"),),
        _sw("was over de het een en van is dat niet te op met voor zijn wordt worden door als er aan bij "
            "ook om of deze dit kan naar uit dan wanneer moet heeft"),
    ),
    Language(
        "pol", "Polish", "Latin", LATIN, (_man("manpages-pl"), _fortune("fortunes-pl")),
        _sw("i w na z nie się jest do że to jak o lub od przez dla jeśli są tak ten ta tego po "
            "przy może być tylko czy oraz jako gdy które który która także"),
        CE_ENC,
    ),
    Language(
        "ces", "Czech", "Latin", LATIN, (_man("manpages-cs"), _fortune("fortunes-cs")),
        _sw("a v na se je že s z do to k o pro ve nebo jako jsou by ale tak jen když není být "
            "které který která také jeho podle při"),
        CE_ENC,
    ),
    Language(
        "dan", "Danish", "Latin", LATIN, (_man("manpages-da"),),
        _sw("for have under over og i at er en et til af på med den det de som for ikke eller kan der har fra vil skal "
            "hvis når blive bliver være også denne dette"),
    ),
    Language(
        "swe", "Swedish", "Latin", LATIN, (_man("manpages-sv"),),
        _sw("under och i att är en ett till av på med den det de som för inte eller kan har från ska "
            "om när vara också denna detta eller samt används"),
    ),
    Language(
        "fin", "Finnish", "Latin", LATIN, (_man("manpages-fi"),),
        _sw("ja on ei se että tai kun jos ovat kuin sen myös mutta tämä joka jotka voi olla "
            "mukaan vain ole sitä siitä niin kanssa"),
    ),
    Language(
        "hun", "Hungarian", "Latin", LATIN, (_man("manpages-hu"),),
        _sw("a az és egy hogy nem is van meg ha vagy ez azt csak mint már el amely ki be által "
            "lesz lehet kell nincs szerint"),
        CE_ENC,
    ),
    Language(
        "ron", "Romanian", "Latin", LATIN, (_man("manpages-ro"),),
        _sw("are și în de la a cu nu se este pe un o care din pentru sau ca dacă sunt fi mai acest "
            "această al ale lui"),
        CE_ENC,
    ),
    Language(
        "tur", "Turkish", "Latin", LATIN, (_man("manpages-tr"),),
        _sw("ve bir bu için ile de da olarak olan gibi veya ise daha çok ya değil eğer sonra "
            "kadar her göre olur ki ne"),
        ("iso-8859-9",),
    ),
    Language(
        "vie", "Vietnamese", "Latin", LATIN, (_man("manpages-vi"),),
        _sw("và của là các có không được trong cho một những với để này khi từ đã người theo "
            "nếu thì cũng tập tin"),
    ),
    Language(
        "ind", "Indonesian", "Latin", LATIN, (_man("manpages-id"),),
        _sw("dan yang di ke dari ini itu dengan untuk tidak atau akan pada adalah jika dalam "
            "oleh juga dapat ada sebagai berkas"),
    ),
    Language(
        "epo", "Esperanto", "Latin", LATIN, (_fortune("fortunes-eo"),),
        _sw("la kaj de en estas al ne por kiu mi vi li ŝi ĝi ni ili sed kun se tio ke pli el"),
        ("iso-8859-3",),
    ),
    Language(
        "gle", "Irish", "Latin", LATIN, (_fortune("fortunes-ga"),),
        _sw("an na agus ar is le do go bhí sé sí ní ach mar a ag ó leis níl tá"),
    ),
    Language(
        "rus", "Russian", "Cyrillic", CYRILLIC, (_man("manpages-ru"), _fortune("fortunes-ru")),
        _sw("и в не на что с по как это для или то если из от же к а но он она они так только "
            "быть при при все может будет"),
        CYR_ENC,
    ),
    Language(
        "ukr", "Ukrainian", "Cyrillic", CYRILLIC, (_man("manpages-uk"),),
        _sw("і й в у на не що з та для як це або до від якщо за при буде може але його є бути"),
        CYR_ENC,
    ),
    Language(
        "srp", "Serbian", "Cyrillic", CYRILLIC, (_man("manpages-sr"),),
        _sw("и у на је да се не за са од или као што ако из то су може бити све ова овај"),
        CYR_ENC,
    ),
    Language(
        "bul", "Bulgarian", "Cyrillic", CYRILLIC, (_fortune("fortunes-bg"),),
        _sw("и в на е да се не за с от че по това са като но или го той тя ще бъде ако"),
        CYR_ENC,
    ),
    Language(
        "ell", "Greek", "Greek", ("Greek",), (_man("manpages-el"),),
        _sw("και το η ο να του της την των σε με για από που είναι δεν στο στην ή θα τα οι αν"),
        ("iso-8859-7",),
    ),
    Language(
        "jpn", "Japanese", "Kana + Han", ("Kana", "Han"), (_man("manpages-ja"),),
        encodings=("euc-jp", "shift_jis"),
    ),
    Language(
        "zho", "Chinese (Simplified + Traditional)", "Han", ("Han",),
        (_man("manpages-zh"), _fortune("fortunes-zh", "usr/share/games/fortunes/chinese")),
        encodings=("gb18030", "big5"),
    ),
)  # fmt: skip

BY_CODE: dict[str, Language] = {lang.code: lang for lang in LANGUAGES}
