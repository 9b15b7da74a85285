"""The attack corpus: handlers that try to get out of the sandbox, each with the one error
code it must fail with, followed every time by a normal invocation that must still succeed.

Runtime attacks share one deployment (one template process): every attack is its own
handler file ``attack_<id>.py`` next to ``ok.py``. Attacks RestrictedPython rejects at
compile time cannot live there (one compile error rejects the whole deployment), so they
are checked with ``validate`` for the file and line. Attacks on the limits run in small
deployments of their own, with limits small enough to keep this module fast.

Where an attack needs an interpreter-internal object to be in hand before it tries to use
it (a traceback for the C-level iteration cases), it gets one the way a handler really
can, without tripping any guard (a logging handler's ``record.exc_info``); the control
tests at the bottom show those preparations succeed on their own, so each violation comes
from the step that is being tested.

Cases commented "Escaped before the fix" got out of the RestrictedPython layer (some of them
as far as os and open) until sandbox/guards.py or sandbox/policy.py was changed to refuse
them; the comment says which way they went.
"""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import sandbox
from sandbox import Deployment, Limits, Policy, WorkerPool
from sandbox.errors import DeployRejected
from sandbox.guards import Guards
from sandbox.pool import InvocationResult, validate

# Host paths that must never show up in what a handler's caller is told.
HOST_PATHS = (
    str(Path(sandbox.__file__).resolve().parent.parent),
    str(Path(json.__file__).resolve().parent.parent),
)

# Attacks on the guards' bookkeeping need hash(types.ModuleType) without holding it: a
# static type sits at a fixed distance from ``int`` in the interpreter binary, which an
# attacker can measure offline on the same Python build.
MODULE_TYPE_OFFSET = id(types.ModuleType) - id(int)
CODE_TYPE_OFFSET = id(types.CodeType) - id(int)


def code_args(source: str) -> list[Any]:
    """The CodeType(...) arguments of the one function in ``source``, compiled on the host
    without restrictions, as an attacker would prepare them offline."""
    module = compile(textwrap.dedent(source), "evil.py", "exec")
    co = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    return [
        co.co_argcount, co.co_posonlyargcount, co.co_kwonlyargcount, co.co_nlocals,
        co.co_stacksize, co.co_flags, co.co_code, co.co_consts, co.co_names, co.co_varnames,
        co.co_filename, co.co_name, co.co_qualname, co.co_firstlineno, co.co_linetable,
        co.co_exceptiontable, co.co_freevars, co.co_cellvars,
    ]  # fmt: skip


# Bytecode that reaches os through object.__subclasses__, with no guard in the way.
OS_GLOBALS_CODE_ARGS = code_args(
    """
    def evil():
        for c in ().__class__.__base__.__subclasses__():
            if c.__name__ == "_wrap_close":
                return c.__init__.__globals__
    """
)

EVENT = {"username": "bob"}

OK = """
import json
import logging
import math


def handle_event(event, context):
    logging.getLogger("ok").info("fine")
    return {"user": event.username, "pi": math.pi, "json": json.dumps([1, "a"])}
"""
OK_VALUE = {"user": "bob", "pi": 3.141592653589793, "json": '[1, "a"]'}


def handler(body: str, prelude: str = "") -> str:
    """A handler module: ``prelude`` at module level, ``body`` inside ``handle_event``."""
    return (
        textwrap.dedent(prelude).strip()
        + "\n\n\ndef handle_event(event, context):\n"
        + textwrap.indent(textwrap.dedent(body).strip(), "    ")
        + "\n"
    )


# A traceback in hand, obtained as a handler really can: a logging handler sees the
# record of ``log.exception`` with ``exc_info`` = (type, exception, traceback). Reading
# ``record.exc_info`` is an ordinary attribute read of a tuple; no guard refuses it.
HELD_EXC_INFO = """
import logging


def held_exc_info():
    box = []

    class Grab(logging.Handler):
        def emit(self, record):
            box.append(record.exc_info)

    log = logging.getLogger("attack")
    grab = Grab()
    log.addHandler(grab)
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("boom")
    log.removeHandler(grab)
    return box[0]
"""

# The same through a context manager built with a user metaclass call, whose __exit__
# receives the traceback as a plain argument.
HELD_TRACEBACK = """
import numbers


def held_traceback():
    got = []

    def enter(self):
        return self

    def leave(self, kind, exc, tb):
        got.append(tb)
        return True

    Catcher = numbers.ABCMeta("Catcher", (), {"__enter__": enter, "__exit__": leave})
    with Catcher():
        1 / 0
    return got.pop()
"""

# A metaclass whose classes compare equal to anything and hash like ``target``: with a
# class of it registered by the class-statement hook, an ==/hash based registry of user
# classes would take ``target`` (a stdlib class, or ModuleType) for a user class and let
# its attributes be written.
SPOOF_USER_CLASS = """
import numbers


def pointer_hash(address):
    h = ((address >> 4) | (address << 60)) & 0xFFFFFFFFFFFFFFFF
    if h >= 2 ** 63:
        h -= 2 ** 64
    return -2 if h == -1 else h


def register_lookalike(target_hash):
    def equal(cls, other):
        return True

    def same_hash(cls):
        return target_hash

    Meta = numbers.ABCMeta(
        "Meta", (numbers.ABCMeta,), {"__eq__": equal, "__hash__": same_hash}
    )
    Base = Meta("Base", (), {})

    class Lookalike(Base):
        pass

    return Lookalike


# What a guard compares an object of a lookalike type with, when it compares by ==.
def types_compared_with(target_hash):
    got = []

    def equal(cls, other):
        got.append(other)
        return False

    def same_hash(cls):
        return target_hash

    Meta = numbers.ABCMeta("Meta", (numbers.ABCMeta,), {"__eq__": equal, "__hash__": same_hash})
    for item in [Meta("Probe", (), {})()]:
        pass
    return got
"""

STR_SUBCLASS = """
class Sneaky(str):
    def startswith(self, prefix, *args):
        return False

    def __eq__(self, other):
        return False

    def __contains__(self, item):
        return False
"""


@dataclass(frozen=True)
class Attack:
    id: str
    code: str
    source: str
    # A fragment the error message must contain, where which refusal fires matters.
    message: str = ""
    # Known not to pass yet, and why (a bug outside guards.py/policy.py).
    xfail: str = ""


def attack(id: str, code: str, source: str, message: str = "", xfail: str = "") -> Attack:
    return Attack(id, code, source, message, xfail)


def params(attacks: list[Attack]) -> list[Any]:
    return [
        pytest.param(a, id=a.id, marks=[pytest.mark.xfail(strict=True, reason=a.xfail)])
        if a.xfail
        else pytest.param(a, id=a.id)
        for a in attacks
    ]


V, F, R, T = "sandbox_violation", "function_error", "resource_limit", "timeout"

RUNTIME_ATTACKS: list[Attack] = [
    # -- frame walks ------------------------------------------------------------------------
    attack(
        "getattr_gi_frame",
        V,
        handler("""
            def gen():
                yield 1
            g = gen()
            frame = getattr(g, "gi_frame")
            return getattr(getattr(frame, "f_back"), "f_globals")
        """),
        "gi_frame",
    ),
    attack(
        "running_generator_frame",
        V,
        handler("""
            me = []
            def gen():
                yield getattr(me[0], "gi_frame")
            me.append(gen())
            frame = next(me[0])
            return getattr(frame, "f_back")
        """),
        "gi_frame",
    ),
    attack(
        "getattr_gi_frame_with_default",
        V,
        handler("""
            g = (x for x in [1])
            return getattr(g, "gi_frame", None)
        """),
    ),
    attack(
        "getattr_cr_and_ag_frame",
        V,
        handler("""
            g = (x for x in [1])
            return [getattr(g, "cr_frame", 1), getattr(g, "ag_frame", 1)]
        """),
    ),
    attack(
        "traceback_from_logging_record",
        V,
        handler("return getattr(held_exc_info()[2], 'tb_frame')", HELD_EXC_INFO),
        "traceback objects",
    ),
    attack(
        "traceback_from_exit_tb_frame",
        V,
        handler("return getattr(held_traceback(), 'tb_frame')", HELD_TRACEBACK),
        "tb_frame",
    ),
    attack(
        "traceback_from_exit_any_attribute",
        V,
        handler("return getattr(held_traceback(), 'tb_lineno')", HELD_TRACEBACK),
        "traceback objects",
    ),
    # -- attribute reads through formatting -------------------------------------------------
    attack(
        "str_format_reads_attributes",
        V,
        handler("return '{0.__class__.__mro__}'.format(event)"),
        "str.format",
    ),
    attack(
        "getattr_format",
        V,
        handler("fmt = getattr('{0.__class__}', 'format')\nreturn fmt(1)"),
        "str.format",
    ),
    attack(
        "format_map",
        V,
        handler("return '{x.__class__}'.format_map({'x': event})"),
        "str.format_map",
    ),
    attack(
        "unbound_str_format",
        V,
        handler("return str.format('{0.__class__}', event)"),
        "str.format",
    ),
    attack(
        "str_subclass_format",
        V,
        handler(
            """
            class S(str):
                pass
            return S('{0.__class__}').format(event)
            """
        ),
        "str.format",
    ),
    attack(
        # Escaped before the fix: the object is a super proxy, not a str.
        "super_proxy_bound_format",
        V,
        handler(
            """
            class S(str):
                pass
            def gen():
                yield 1
            fmt = super(S, S('{0.gi_frame}|{0.__class__.__mro__}')).format
            return fmt(gen())
            """
        ),
        "str.format",
    ),
    attack(
        "super_proxy_unbound_format_map",
        V,
        handler(
            """
            class S(str):
                pass
            fmt = getattr(super(S, S), 'format_map')
            return fmt('{x.__class__}', {'x': event})
            """
        ),
        "str.format_map",
    ),
    attack(
        "string_formatter_get_field",
        V,
        handler("return string.Formatter().get_field('0.__class__', [event], {})", "import string"),
        "string.Formatter",
    ),
    attack(
        "from_string_import_formatter",
        V,
        handler(
            "return Formatter().format('{0.__class__}', event)", "from string import Formatter"
        ),
        "string.Formatter",
    ),
    attack(
        "logging_formatter_brace_style",
        V,
        handler(
            """
            fmt = logging.Formatter('{msg.__class__.__mro__}', style='{')
            return fmt.format(logging.LogRecord('x', 20, 'p', 1, event, (), None))
            """,
            "import logging",
        ),
        "logging.Formatter",
    ),
    attack(
        "logging_str_format_style",
        V,
        handler("return logging.StrFormatStyle('{message.__class__}')", "import logging"),
        "logging.StrFormatStyle",
    ),
    attack(
        # Escaped before the fix: S[int] is a types.GenericAlias (from Sequence's
        # __class_getitem__) that forwards the attribute read to S, and is no str or type.
        "generic_alias_of_str_subclass_format",
        V,
        handler(
            """
            class S(str, collections.abc.Sequence):
                pass
            return S[int].format('{0.__class__.__mro__}', event)
            """,
            "import collections.abc",
        ),
        "str.format",
    ),
    # -- class hierarchy walks --------------------------------------------------------------
    attack(
        "getattr_class_mro",
        V,
        handler("return getattr(getattr((), '__class__'), '__mro__')"),
        "private",
    ),
    attack(
        "getattr_subclasses",
        V,
        handler("return len(getattr(object, '__subclasses__')())"),
        "private",
    ),
    attack("mro_method", V, handler("return int.mro()"), "interpreter internals"),
    attack(
        "str_subclass_attribute_name",
        V,
        handler("return getattr((), Sneaky('__class__'))", STR_SUBCLASS),
        "plain strings",
    ),
    attack(
        "str_subclass_hasattr",
        V,
        handler("return hasattr(event, Sneaky('__class__'))", STR_SUBCLASS),
        "plain strings",
    ),
    attack(
        "str_subclass_setattr",
        V,
        handler(
            """
            class Box:
                pass
            setattr(Box, Sneaky('__class__'), int)
            return 1
            """,
            STR_SUBCLASS,
        ),
        "private",
    ),
    attack(
        "attribute_error_obj_leaks_module",
        V,
        handler(
            """
            try:
                logging.no_such_attribute
            except AttributeError as exc:
                leaked = exc.obj
            return leaked.os.getcwd()
            """,
            "import logging",
        ),
        "module 'os'",
    ),
    # -- C-level iteration over things holding a traceback -----------------------------------
    *[
        attack(f"c_iteration_{name}", V, handler(body, HELD_EXC_INFO), "traceback objects")
        for name, body in [
            ("sorted", "return sorted(held_exc_info(), key=id)"),
            ("zip", "return list(zip(held_exc_info(), 'abc'))"),
            ("tuple", "return tuple(held_exc_info())"),
            ("bytes", "return bytes(held_exc_info()[::-1])"),
            ("str_join", "return ''.join(held_exc_info())"),
            ("list", "return list(held_exc_info())"),
            ("map", "return list(map(repr, held_exc_info()))"),
            ("set", "return set(held_exc_info())"),
            ("dict", "return dict(enumerate(held_exc_info()))"),
            ("max", "return max(held_exc_info(), key=id)"),
            ("filter", "return list(filter(None, held_exc_info()))"),
            ("reversed", "return list(reversed(held_exc_info()))"),
            ("unpacking", "kind, exc, tb = held_exc_info()\nreturn tb"),
            ("for_loop", "for item in held_exc_info():\n    pass"),
            ("iter_next", "it = iter(held_exc_info()[::-1])\nreturn next(it)"),
        ]
    ],
    attack(
        "c_iteration_sorted_generator",
        V,
        handler(
            """
            def gen():
                yield 1
            def frames():
                yield getattr(g, "gi_frame")
            g = gen()
            return sorted(frames(), key=id)
            """
        ),
        "gi_frame",
    ),
    # -- modules reached through attributes of allowed ones ---------------------------------
    attack("logging_os", V, handler("return logging.os.getcwd()", "import logging"), "'os'"),
    attack(
        # dataclasses.builtins was the way in; dataclasses itself is now off the allowlist.
        "dataclasses_builtins",
        V,
        handler("return dataclasses.builtins.open('/etc/passwd')", "import dataclasses"),
        "'dataclasses'",
    ),
    attack(
        "uuid_sys_modules",
        V,
        handler("return uuid.sys.modules['builtins'].open('/etc/passwd')", "import uuid"),
        "'sys'",
    ),
    attack(
        "datetime_sys",
        V,
        handler("return datetime.sys.modules['os'].getcwd()", "import datetime"),
        "'sys'",
    ),
    attack(
        "json_decoder_re_enum",
        V,
        handler("return json.decoder.re.enum.sys.modules", "import json.decoder"),
        "'enum'",
    ),
    attack(
        "fractions_operator_attrgetter",
        V,
        handler(
            "return fractions.operator.attrgetter('gi_frame')(x for x in [1])",
            "import fractions",
        ),
        "'operator'",
    ),
    attack(
        "getattr_logging_sys",
        V,
        handler("return getattr(logging, 'sys').modules['os']", "import logging"),
        "'sys'",
    ),
    attack("from_logging_import_os", V, handler("return os.getcwd()", "from logging import os")),
    attack(
        "dunder_builtins_of_module",
        V,
        handler("return getattr(json, '__builtins__')['__import__']('os')", "import json"),
        "private",
    ),
    attack(
        # Escaped before the fix, all the way to os and open: a GenericAlias wrapping a module
        # forwards attribute reads past the module-attribute denylist (string.Formatter), and
        # a super() proxy of a Formatter subclass passed the isinstance check on get_field,
        # which then walks any attribute path and returns the real object.
        "generic_alias_module_proxy_to_os",
        V,
        handler(
            """
            Formatter = logging.GenericAlias(string, ()).Formatter
            class F(Formatter):
                pass
            get_field = super(F, F()).get_field
            subclasses = get_field('0.__class__.__base__.__subclasses__', [()], {})[0]()
            for cls in subclasses:
                if 'os._wrap_close' in repr(cls):
                    g = get_field('0.__init__.__globals__', [cls], {})[0]
                    return [g['getcwd'](), g['__builtins__']['open']('/etc/hostname').read()]
            """,
            "import logging\nimport string",
        ),
        "types.GenericAlias",
    ),
    attack(
        "generic_alias_from_difflib",
        V,
        handler(
            "return GenericAlias(logging, ()).currentframe()",
            "import logging\nfrom difflib import GenericAlias",
        ),
        "types.GenericAlias",
    ),
    attack(
        # Escaped before the fix (dataclasses was allowed): make_dataclass takes "_"-names as
        # fields and asdict reads them with the real getattr, which hands out
        # object.__reduce_ex__; asdict's deepcopy then runs a user __reduce_ex__ from a
        # stdlib frame, where reducing a bound method yields the real builtins.getattr.
        "dataclasses_private_fields_to_real_getattr",
        V,
        handler(
            """
            MetaDC = dataclasses.make_dataclass(
                'MetaDC', [('__reduce_ex__', object)], bases=(numbers.ABCMeta,),
                init=False, eq=False,
            )
            reduce_ex = dataclasses.asdict(MetaDC('X', (), {}))['__reduce_ex__']
            R = numbers.ABCMeta(
                'R', (), {'__reduce_ex__': lambda self, proto: (reduce_ex, ([].append, 2))}
            )
            Holder = dataclasses.make_dataclass('Holder', [('x', object)])
            real_getattr = dataclasses.asdict(Holder(R()))['x'][0]
            module = real_getattr(real_getattr, '__self__')
            os = real_getattr(module, '__import__')('os')
            return [os.getcwd(), sorted(os.environ)]
            """,
            "import dataclasses\nimport numbers",
        ),
        "'dataclasses'",
    ),
    attack(
        # Escaped before the fix: UserDict.copy() runs copy.copy(); with __copy__ = None the
        # __reduce_ex__ protocol calls what the user returns and sets any attribute on it.
        "userdict_copy_reduce_sets_module_attribute",
        V,
        handler(
            """
            def reduce_ex(self, proto):
                return (lambda: math, (), (None, {'pi': 3}))
            U = numbers.ABCMeta(
                'U', (collections.UserDict,), {'__reduce_ex__': reduce_ex, '__copy__': None}
            )
            try:
                U().copy()
            except AttributeError:
                pass
            return math.pi
            """,
            "import collections\nimport math\nimport numbers",
        ),
        "collections.UserDict",
    ),
    attack(
        # Escaped before the fix: Enum's functional API takes any dunder as a "member" and
        # compares it with object.__reduce_ex__ to look for mixin overrides, handing that to
        # a user __eq__; reducing a bound method through the guarded map() (whose generator
        # frame has the real builtins) then yields the real builtins.getattr.
        "enum_mixin_check_hands_out_reduce_ex",
        V,
        handler(
            """
            got = []
            class Spy:
                def __eq__(self, other):
                    got.append(other)
                    return False
            Base = uuid.Enum('Base', [('__reduce_ex__', Spy())])
            Base('Leaky', 'a b')
            reduce_ex = [g for g in got if 'reduce_ex' in repr(g)][0]
            real_getattr = list(map(reduce_ex, [(1).bit_length], [2]))[0][0]
            module = real_getattr(real_getattr, '__self__')
            return real_getattr(module, '__import__')('os').getcwd()
            """,
            "import uuid",
        ),
        "uuid.Enum",
    ),
    attack(
        "from_collections_import_userdict",
        V,
        handler("return UserDict().copy()", "from collections import UserDict"),
        "collections.UserDict",
    ),
    attack(
        # Escaped before the fix: ``type(x) in FORBIDDEN_TYPES`` hashed and compared a user
        # type, handing its metaclass's __eq__ types.CodeType to build code objects with.
        "type_check_hands_out_code_type",
        F,
        handler(
            f"""
            got = types_compared_with(pointer_hash(id(int) + {CODE_TYPE_OFFSET}))
            code_type = [t for t in got if repr(t) == "<class 'code'>"][0]
            return repr(code_type(0, 0, 0, 0, 1, 0, b'', (), (), (), 'x', 'x', 'x', 1, b'', b''))
            """,
            SPOOF_USER_CLASS,
        ),
        "IndexError",
    ),
    attack(
        # Escaped before the fixes, as a whole: code type from the type check above, then
        # UserDict.copy's reduce protocol sets a function's __code__ to unrestricted bytecode.
        "code_swap_via_type_check_and_userdict_copy",
        F,
        handler(
            f"""
            got = types_compared_with(pointer_hash(id(int) + {CODE_TYPE_OFFSET}))
            code_type = [t for t in got if repr(t) == "<class 'code'>"][0]
            evil = code_type(*{OS_GLOBALS_CODE_ARGS!r})
            def target():
                return None
            def reduce_ex(self, proto):
                return (lambda: target, (), (None, {{'__code__': evil}}))
            U = numbers.ABCMeta(
                'U', (collections.UserDict,), {{'__reduce_ex__': reduce_ex, '__copy__': None}}
            )
            try:
                U().copy()
            except AttributeError:
                pass
            os_globals = target()
            return [os_globals['getcwd'](), sorted(os_globals['environ'])]
            """,
            "import collections\n" + SPOOF_USER_CLASS,
        ),
        "IndexError",
    ),
    attack(
        # json.tool is a submodule of an allowed package: it opens the files named in
        # sys.argv and exposes pathlib.Path (read, write, unlink anything the uid may).
        "json_tool_pathlib",
        V,
        handler("return Path('/etc/hostname').read_text()", "from json.tool import Path"),
        "json.tool",
    ),
    attack(
        # Not imported on the way (json.tool is denied), so just a missing attribute.
        "from_json_import_tool",
        F,
        handler("return tool.main()", "from json import tool"),
        "has no attribute 'tool'",
    ),
    # -- imports ----------------------------------------------------------------------------
    *[
        attack(f"import_{module.replace('.', '_')}", V, handler("return 1", f"import {module}"))
        for module in (
            "os",
            "sys",
            "subprocess",
            "ctypes",
            "importlib",
            "gc",
            "inspect",
            "pickle",
            "marshal",
            "operator",
            "functools",
            "socket",
            "typing",
            "logging.config",
            "logging.handlers",
            "urllib.request",
        )
    ],
    attack("from_logging_import_config", V, handler("return 1", "from logging import config")),
    attack("relative_import", V, handler("return 1", "from . import ok"), "relative"),
    attack(
        "import_inside_handler",
        V,
        handler("import os\nreturn os.listdir('/')"),
        "not allowed in chat functions",
    ),
    # -- denied builtins --------------------------------------------------------------------
    attack("bound_open", V, handler("f = open\nreturn f('/etc/passwd').read()"), "open()"),
    attack("bound_eval", V, handler("e = eval\nreturn e('1 + 1')"), "eval()"),
    attack("bound_exec", V, handler("x = exec\nx('import os')"), "exec()"),
    attack("compile_call", V, handler("return compile('1', 'f', 'eval')"), "compile()"),
    attack("bound_globals", V, handler("g = globals\nreturn g()"), "globals()"),
    attack("bound_vars", V, handler("v = vars\nreturn v(event)"), "vars()"),
    attack("bound_type", V, handler("t = type\nreturn t(event)"), "type()"),
    attack("type_of_event", V, handler("return type(event)"), "type()"),
    attack("locals_dir", V, handler("return [locals(), dir()]"), "locals()"),
    attack("memoryview", V, handler("return memoryview(b'x')"), "memoryview()"),
    # -- writes to shared objects -----------------------------------------------------------
    attack(
        "write_module_attribute",
        V,
        handler("json.loads = len\nreturn 1", "import json"),
        "cannot modify 'json'",
    ),
    attack(
        "setattr_math_pi",
        V,
        handler("setattr(math, 'pi', 3)\nreturn math.pi", "import math"),
        "cannot modify 'math'",
    ),
    attack(
        "write_logging_root",
        V,
        handler("logging.root = None\nreturn 1", "import logging"),
        "cannot modify 'logging'",
    ),
    attack(
        "delete_module_attribute",
        V,
        handler("del json.dumps\nreturn 1", "import json"),
        "cannot",
    ),
    attack(
        "write_stdlib_class",
        V,
        handler("json.JSONDecoder.decode = len\nreturn 1", "import json"),
        "cannot modify 'JSONDecoder'",
    ),
    attack(
        "write_builtin_type_method",
        V,
        handler("list.append = None\nreturn 1"),
        "cannot set attributes",
    ),
    attack(
        # Escaped before the fix: the registry of user classes was a WeakSet (==/hash).
        "spoofed_user_class_writes_stdlib_class",
        V,
        handler(
            """
            register_lookalike(hash(json.JSONDecoder))
            json.JSONDecoder.decode = len
            return json.loads('[1]')
            """,
            "import json\n" + SPOOF_USER_CLASS,
        ),
        "cannot modify 'JSONDecoder'",
    ),
    attack(
        # Escaped before the fix, as above, for module attributes.
        "spoofed_user_class_writes_module",
        V,
        handler(
            f"""
            register_lookalike(pointer_hash(id(int) + {MODULE_TYPE_OFFSET}))
            math.pi = 3
            return math.pi
            """,
            "import math\n" + SPOOF_USER_CLASS,
        ),
        "cannot modify 'math'",
    ),
    attack(
        "write_event",
        F,
        handler("event.username = 'admin'\nreturn event.username"),
        "read-only",
    ),
    attack(
        "write_secrets",
        F,
        handler("context.secrets['api_key'] = 'x'\nreturn 1"),
        "read-only",
    ),
    # -- logging's ways out -----------------------------------------------------------------
    attack(
        "logging_currentframe",
        V,
        handler("return getattr(logging.currentframe(), 'f_back')", "import logging"),
        "logging.currentframe",
    ),
    attack(
        "logging_file_handler_1gib",
        V,
        handler(
            """
            log = logging.getLogger('big')
            log.addHandler(logging.FileHandler('big.log'))
            chunk = 'x' * (1 << 20)
            for _ in range(1024):
                log.error(chunk)
            return 1
            """,
            "import logging",
        ),
        "logging.FileHandler",
    ),
    attack(
        "logging_basic_config_file",
        V,
        handler("logging.basicConfig(filename='/tmp/chatfn-pwned')", "import logging"),
        "logging.basicConfig",
    ),
    # -- processes, files, environment, network ---------------------------------------------
    attack(
        "fork_via_logging_os",
        V,
        handler("return logging.os.fork()", "import logging"),
        "'os'",
    ),
    attack(
        "exec_via_subprocess",
        V,
        handler("return subprocess.run(['id'], capture_output=True).stdout", "import subprocess"),
    ),
    attack(
        "read_proc_1_environ",
        V,
        handler("return open('/proc/1/environ', 'rb').read().decode()"),
        "open()",
    ),
    attack(
        "read_host_environment",
        V,
        handler("return dict(logging.os.environ)", "import logging"),
        "'os'",
    ),
    attack(
        "read_database_file",
        V,
        # event.database: a world-readable file the host owns (the database_file fixture).
        handler("return open(event.database).read()"),
        "open()",
    ),
    attack(
        "open_socket",
        V,
        handler(
            "return socket.create_connection(('127.0.0.1', 22), timeout=1)",
            "import socket",
        ),
    ),
    # -- catching the refusal does not make it go away --------------------------------------
    attack(
        "swallowed_violation",
        V,
        handler(
            """
            try:
                getattr(event, '__class__')
            except BaseException:
                pass
            return 'nothing to see'
            """
        ),
        "private",
    ),
    attack(
        "violation_then_session_rejected",
        V,
        handler(
            """
            try:
                getattr(logging, 'os')
            except BaseException:
                raise SessionRejected('looks like a normal rejection')
            """,
            "import logging",
        ),
    ),
    # -- resources --------------------------------------------------------------------------
    attack(
        "memory_bomb",
        R,
        handler(
            """
            blocks = []
            while True:
                blocks.append(bytearray(16 << 20))
            """
        ),
        "out of memory",
    ),
    attack("huge_list", R, handler("return [0] * (1 << 34)"), "out of memory"),
    attack(
        "deep_recursion",
        R,
        handler("def down(n):\n    return down(n + 1) + 1\nreturn down(0)"),
        "recursion",
    ),
    attack(
        "deep_repr_recursion",
        R,
        handler("x = []\nfor _ in range(200000):\n    x = [x]\nreturn repr(x)"),
        "recursion",
    ),
    # -- results the host must not take -----------------------------------------------------
    attack("return_object", F, handler("return object()"), "not JSON-serializable"),
    attack("return_set", F, handler("return {1, 2, 3}"), "not JSON-serializable"),
    attack("return_generator", F, handler("return (x for x in range(3))"), "not JSON-serializable"),
    attack("return_huge_int", F, handler("return 2 ** 70"), "not JSON-serializable"),
    attack("return_huge_value", F, handler("return 'x' * (2 << 20)"), "larger than"),
    attack(
        "return_deeply_nested",
        F,
        handler("x = []\nfor _ in range(1000):\n    x = [x]\nreturn x"),
        "not JSON-serializable",
    ),
    attack("huge_exception_message", F, handler("raise ValueError('x' * 10_000_000)"), "x" * 900),
    attack(
        "exception_str_raises_base_exception",
        F,
        handler(
            """
            def text(self):
                raise BaseException('no message for you')
            raise numbers.ABCMeta('Odd', (Exception,), {'__str__': text})()
            """,
            "import numbers",
        ),
    ),
]

# Attacks on wall-clock and CPU limits, each in a deployment with small limits.
TIMEOUT_LIMITS = Limits(timeout_ms=700)
TIMEOUT_ATTACKS: list[Attack] = [
    attack("infinite_loop", T, handler("while True:\n    pass")),
    attack(
        "infinite_loop_swallowing_everything",
        T,
        handler(
            """
            while True:
                try:
                    while True:
                        pass
                except BaseException:
                    pass
            """
        ),
    ),
    attack("sleep", T, handler("time.sleep(3600)", "import time")),
    attack(
        "catastrophic_regex",
        T,
        handler("return re.match('(a+)+$', 'a' * 64 + 'b')", "import re"),
    ),
]
CPU_LIMITS = Limits(timeout_ms=5000, cpu_seconds=1)
CPU_ATTACKS: list[Attack] = [
    attack("cpu_burn", R, handler("n = 0\nwhile True:\n    n += 1"), "CPU time"),
]

# Attacks RestrictedPython rejects at compile time; the line marked "# <-" is the one the
# error must name.
COMPILE_ATTACKS: list[Attack] = [
    attack("gi_frame_attribute", "", handler("g = (x for x in [1])\nreturn g.gi_frame  # <-")),
    attack(
        "f_back_attribute",
        "",
        handler("g = (x for x in [1])\nf = getattr(g, 'gi_frame')\nreturn f.f_back  # <-"),
    ),
    attack(
        "tb_frame_attribute",
        "",
        handler(
            """
            try:
                1 / 0
            except Exception as e:
                return e.__traceback__.tb_frame  # <-
            """
        ),
    ),
    attack("class_mro_attribute", "", handler("return ().__class__.__mro__  # <-")),
    attack(
        "subclasses_attribute",
        "",
        handler("return object.__subclasses__()  # <-"),
    ),
    attack("f_string_private_attribute", "", handler("return f'{event.__class__}'  # <-")),
    attack("exec_call", "", handler("exec('import os')  # <-")),
    attack("eval_call", "", handler("return eval('1 + 1')  # <-")),
    attack(
        "try_star_exception_group_subclass",
        "",
        handler(
            """
            try:  # <-
                raise Group('x', [ValueError('y')])
            except* ValueError as group:
                return group
            """,
            "class Group(ExceptionGroup):\n    pass",
        ),
    ),
    attack(
        "async_def",
        "",
        "async def handle_event(event, context):  # <-\n    return 1\n",
    ),
    attack(
        "positional_only_getattr_default",
        "",
        handler(
            "return peek((x for x in [1]))",
            "def peek(gen, _getattr_=getattr, /):  # <-\n    return gen.gi_running",
        ),
    ),
    attack(
        "positional_only_getiter_default",
        "",
        handler(
            "return walk([1])",
            "def walk(items, _getiter_=iter, /):  # <-\n    return [x for x in items]",
        ),
    ),
    attack(
        "keyword_only_write_default",
        "",
        handler("return f()", "def f(*, _write_=lambda x: x):  # <-\n    return 1"),
    ),
    attack("lambda_guard_default", "", handler("f = lambda _getitem_=None: 1  # <-\nreturn f()")),
    attack("assign_guard_name", "", handler("_getattr_ = getattr  # <-\nreturn 1")),
    attack("dunder_import_name", "", handler("return __import__('os')  # <-")),
    attack("dunder_builtins_name", "", handler("return __builtins__  # <-")),
    attack("import_builtins", "", handler("return 1", "import builtins  # <-")),
    attack("breakpoint_bound", "", handler("b = breakpoint  # <-\nreturn b")),
    attack(
        "match_class_pattern_reads_attributes",
        "",
        handler(
            """
            g = (x for x in [1])
            match g:  # <-
                case object(gi_frame=frame):
                    return frame
            """
        ),
    ),
    attack(
        "private_attribute_write",
        "",
        handler("json._default_encoder = None  # <-", "import json"),
    ),
]


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def database_file() -> Iterator[str]:
    """A file the host owns that any uid could read: only the sandbox stands in the way."""
    root = Path(tempfile.mkdtemp(prefix="chatfn-attack-db-"))
    root.chmod(0o755)
    path = root / "chatfn.db"
    path.write_text("secret-token-of-another-app\n")
    path.chmod(0o644)
    yield str(path)
    shutil.rmtree(root, ignore_errors=True)


def deployment(version: int, attacks: list[Attack], limits: Limits) -> Deployment:
    files = {"ok.py": OK, **{f"attack_{a.id}.py": a.source for a in attacks}}
    return Deployment(app="attacks", version=version, files=files, limits=limits)


SHARED = deployment(1, RUNTIME_ATTACKS, Limits(timeout_ms=3000))
SLOW = deployment(2, TIMEOUT_ATTACKS, TIMEOUT_LIMITS)
CPU = deployment(3, CPU_ATTACKS, CPU_LIMITS)


# ---- checks -----------------------------------------------------------------------------


def assert_failed_as(result: InvocationResult, case: Attack, files: set[str]) -> None:
    error = result.error
    assert not result.ok and error is not None, f"{case.id} was not refused: {result.value!r}"
    assert error.code == case.code, f"{case.id}: {error.code}: {error.message}\n{result.logs}"
    assert case.message in error.message, f"{case.id}: {error.message!r}"
    assert len(error.message) <= 1000 and len(error.detail or "") <= 16 * 1024
    for text in (error.message, error.detail or "", result.logs):
        for host_path in HOST_PATHS:
            assert host_path not in text, f"{case.id} leaks {host_path}: {text}"
    if error.detail:
        for line in error.detail.splitlines():
            if line.startswith('  File "'):
                assert line.split('"')[1] in files, f"{case.id}: non-user frame {line}"


def assert_still_serves(pool: WorkerPool, d: Deployment) -> None:
    result = pool.invoke(d, "ok", EVENT)
    assert result.ok, result.error
    assert result.value == OK_VALUE


# ---- the corpus -------------------------------------------------------------------------


@pytest.mark.parametrize("case", params(RUNTIME_ATTACKS))
def test_runtime_attack_is_refused(pool: WorkerPool, database_file: str, case: Attack) -> None:
    event: dict[str, Any] = {**EVENT, "database": database_file}
    result = pool.invoke(SHARED, f"attack_{case.id}", event)
    assert_failed_as(result, case, set(SHARED.files))
    assert "secret-token" not in f"{result.value!r}{result.logs}"
    assert_still_serves(pool, SHARED)


@pytest.mark.slow
@pytest.mark.parametrize("case", params(TIMEOUT_ATTACKS))
def test_runaway_handler_times_out(pool: WorkerPool, case: Attack) -> None:
    result = pool.invoke(SLOW, f"attack_{case.id}", EVENT)
    assert_failed_as(result, case, set(SLOW.files))
    assert result.duration_ms < TIMEOUT_LIMITS.timeout_ms + 2000
    assert_still_serves(pool, SLOW)


@pytest.mark.slow
@pytest.mark.parametrize("case", params(CPU_ATTACKS))
def test_cpu_burn_hits_the_cpu_limit(pool: WorkerPool, case: Attack) -> None:
    result = pool.invoke(CPU, f"attack_{case.id}", EVENT)
    assert_failed_as(result, case, set(CPU.files))
    assert_still_serves(pool, CPU)


@pytest.mark.parametrize("case", params(COMPILE_ATTACKS))
def test_compile_time_attack_is_rejected_with_file_and_line(pool: WorkerPool, case: Attack) -> None:
    filename = f"attack_{case.id}.py"
    marked = [n for n, line in enumerate(case.source.splitlines(), 1) if "# <-" in line]
    with pytest.raises(DeployRejected) as caught:
        validate(Deployment(app="attacks-rejected", version=1, files={filename: case.source}))
    errors: list[dict[str, Any]] = caught.value.errors
    assert errors, case.id
    assert {e["file"] for e in errors} == {filename}
    assert marked and errors[0]["line"] == marked[0], errors
    for error in errors:
        for host_path in HOST_PATHS:
            assert host_path not in error["message"]
    assert_still_serves(pool, SHARED)


@pytest.fixture(scope="module")
def reexporting_dependency() -> Iterator[Path]:
    """A declared dependency that re-exports string.Formatter, as libraries do; outside
    pytest's 0700 temp tree so that a worker running as an unprivileged uid can read it."""
    root = Path(tempfile.mkdtemp(prefix="chatfn-attack-deps-"))
    root.chmod(0o755)
    module = root / "textkit.py"
    module.write_text("from string import Formatter\n\n\ndef shout(s):\n    return s.upper()\n")
    module.chmod(0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


FORMATTER_VIA_DEPENDENCY = [
    attack(
        # Escaped before the fix: the isinstance check on Formatter methods does not see
        # through a super() proxy, and get_field returns the real object at the end of any
        # attribute path.
        "dependency_formatter_super_get_field",
        V,
        handler(
            """
            class F(textkit.Formatter):
                pass
            get_field = super(F, F()).get_field
            return repr(get_field('0.__class__.__mro__', [event], {})[0])
            """,
            "import textkit",
        ),
        "string.Formatter",
    ),
    attack(
        "dependency_formatter_unbound_vformat",
        V,
        handler(
            """
            class F(textkit.Formatter):
                pass
            vformat = getattr(super(F, F), 'vformat')
            return vformat(F(), '{0.__class__.__mro__}', [event], {})
            """,
            "import textkit",
        ),
        "string.Formatter",
    ),
    attack(
        "dependency_formatter_direct",
        V,
        handler("return textkit.Formatter().format('{0.__class__}', event)", "import textkit"),
        "string.Formatter",
    ),
]


@pytest.mark.parametrize("case", params(FORMATTER_VIA_DEPENDENCY))
def test_formatter_reexported_by_a_dependency_is_refused(
    pool: WorkerPool, reexporting_dependency: Path, case: Attack
) -> None:
    policy = Policy().with_modules(["textkit"], paths=[str(reexporting_dependency)])
    files = {"ok.py": OK, **{f"attack_{a.id}.py": a.source for a in FORMATTER_VIA_DEPENDENCY}}
    d = Deployment(app="attacks-deps", version=1, files=files, policy=policy)
    result = pool.invoke(d, f"attack_{case.id}", EVENT)
    assert_failed_as(result, case, set(files))
    assert_still_serves(pool, d)


def test_formatter_subclass_from_a_dependency_keeps_its_harmless_methods(
    pool: WorkerPool, reexporting_dependency: Path
) -> None:
    # Control for the cases above: subclassing and super() are fine; only the methods that
    # walk attribute paths are refused.
    policy = Policy().with_modules(["textkit"], paths=[str(reexporting_dependency)])
    source = handler(
        """
        class F(textkit.Formatter):
            pass
        return [textkit.shout('a'), super(F, F()).convert_field(5, 'r')]
        """,
        "import textkit",
    )
    d = Deployment(app="attacks-deps-control", version=1, files={"h.py": source}, policy=policy)
    result = pool.invoke(d, "h", EVENT)
    assert result.ok, (result.error, result.logs)
    assert result.value == ["A", "5"]


def test_json_tool_is_refused_before_it_is_imported() -> None:
    # In this sandbox the worker may not even be able to read json/tool.py (the stdlib can
    # sit below a 0700 home); the refusal must not depend on that.
    guards = Guards(Policy(), lambda text: None)
    with pytest.raises(ImportError, match=r"'json\.tool'"):
        guards.builtins["__import__"]("json.tool", None, None, ("Path",), 0)
    assert not guards.violations  # an ImportError the handler may catch, like any other


def test_rejected_deployment_is_not_served(pool: WorkerPool) -> None:
    bad = Deployment(app="attacks-rejected", version=2, files={"h.py": COMPILE_ATTACKS[0].source})
    result = pool.invoke(bad, "h", EVENT)
    assert result.error is not None and result.error.code == "deploy_rejected"
    assert_still_serves(pool, SHARED)


def test_stdout_flood_is_capped_without_growing_the_host(pool: WorkerPool) -> None:
    # Printing is allowed, so this invocation succeeds: the defence is that the log is a
    # fixed-size shared buffer (Limits.log_bytes) the worker appends to and the host reads
    # once, so 100 MiB of prints (and as much again through context.log) cost the host
    # 64 KiB, and nothing printed can reach the result channel.
    flood = Deployment(
        app="attacks-flood",
        version=1,
        files={
            "ok.py": OK,
            "flood.py": handler(
                """
                line = 'A' * (1 << 20)
                for _ in range(100):
                    print(line)
                    context.log(line)
                return 'done'
                """
            ),
        },
        limits=Limits(timeout_ms=10_000),
    )
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = pool.invoke(flood, "flood", EVENT)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib
    assert result.ok and result.value == "done", result.error
    assert result.logs_truncated
    assert 60 * 1024 < len(result.logs.encode()) <= Limits().log_bytes
    assert set(result.logs) <= {"A", "\n"}
    assert grown_kib < 32 * 1024
    assert_still_serves(pool, flood)


# ---- controls: the preparations of the attacks above are not refused on their own -------


CONTROLS = {
    "held_exc_info": (handler("return len(held_exc_info())", HELD_EXC_INFO), 3),
    "held_traceback": (
        handler("return repr(held_traceback())[:11]", HELD_TRACEBACK),
        "<traceback ",
    ),
    "lookalike_class": (
        handler(
            "return 'Lookalike' in repr(register_lookalike(hash(json.JSONDecoder)))",
            "import json\n" + SPOOF_USER_CLASS,
        ),
        True,
    ),
    "super_proxy": (
        handler("class S(str):\n    pass\nreturn super(S, S('ab')).upper()"),
        "AB",
    ),
    "attribute_error_obj": (
        handler(
            """
            try:
                logging.no_such_attribute
            except AttributeError as exc:
                return exc.obj.INFO
            """,
            "import logging",
        ),
        20,
    ),
    "generic_alias_of_user_class": (
        handler(
            "class S(str, collections.abc.Sequence):\n    pass\nreturn repr(S[int])[-6:]",
            "import collections.abc",
        ),
        "S[int]",
    ),
    "collections_and_difflib_still_work": (
        handler(
            """
            Point = collections.namedtuple('Point', 'x y')
            p = Point(1, 2)
            counts = collections.Counter('aab').most_common(1)
            ratio = difflib.SequenceMatcher(None, 'abc', 'abd').ratio()
            return [p.x + p.y, counts, round(ratio, 2), list(collections.OrderedDict(a=1))]
            """,
            "import collections\nimport difflib",
        ),
        [3, [["a", 2]], 0.67, ["a"]],
    ),
    "user_class_is_writable": (
        handler(
            """
            class Box:
                pass
            Box.size = 3
            b = Box()
            b.size = 4
            return [Box.size, b.size]
            """
        ),
        [3, 4],
    ),
}


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_attack_preparation_alone_succeeds(pool: WorkerPool, name: str) -> None:
    expected = CONTROLS[name][1]
    files = {f"{n}.py": s for n, (s, _) in CONTROLS.items()}
    d = Deployment(app="attacks-controls", version=1, files=files)
    result = pool.invoke(d, name, EVENT)
    assert result.ok, (result.error, result.logs)
    assert result.value == expected


ALL_ATTACKS = (
    RUNTIME_ATTACKS + TIMEOUT_ATTACKS + CPU_ATTACKS + COMPILE_ATTACKS + FORMATTER_VIA_DEPENDENCY
)


def test_enough_cases() -> None:
    ids = [a.id for a in ALL_ATTACKS]
    assert len(ids) >= 40
    assert len(ids) == len(set(ids))
