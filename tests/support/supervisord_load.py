#!/usr/bin/python3
"""Reads conf file paths on stdin, one per line, and answers each with one JSON line: what
supervisord's own config loader makes of that file (every [program:x] option of every
process), or {"error": "..."} if supervisord rejects it. Used by Corral's round-trip tests."""
import json, os, sys, tempfile
from supervisor.options import ServerOptions

def plain(v):
    n = getattr(v, "__name__", None)
    return {"Automatic": "AUTO", "RestartWhenExitUnexpected": "unexpected",
            "RestartUnconditionally": True}.get(n, v if n is None else n)

def load(path):
    d = tempfile.mkdtemp()
    main = os.path.join(d, "supervisord.conf")
    with open(main, "w") as f:
        f.write(f"[supervisord]\nlogfile={d}/s.log\npidfile={d}/s.pid\n"
                f"[unix_http_server]\nfile={d}/s.sock\n"
                "[rpcinterface:supervisor]\n"
                "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
                f"[include]\nfiles = {path}\n")
    o = ServerOptions()
    o.configfile = main
    try:
        o.process_config(do_usage=False)
    except BaseException as e:
        return {"error": str(e)}
    out = {}
    for g in o.process_group_configs:
        for p in g.process_configs:
            r = dict(group=g.name, group_priority=g.priority)
            for k in ("command", "directory", "uid", "umask", "priority", "autostart", "autorestart",
                      "startsecs", "startretries", "stopwaitsecs", "stopasgroup", "killasgroup",
                      "exitcodes", "redirect_stderr", "environment", "serverurl"):
                r[k] = plain(getattr(p, k))
            r["stopsignal"] = int(p.stopsignal)
            r["exitcodes"] = list(p.exitcodes)
            for s in ("stdout", "stderr"):
                for k in ("logfile", "logfile_maxbytes", "logfile_backups", "capture_maxbytes",
                          "events_enabled", "syslog"):
                    r[f"{s}_{k}"] = plain(getattr(p, f"{s}_{k}"))
            out[p.name] = r
    return {"processes": out}

for line in sys.stdin:
    print(json.dumps(load(line.strip()), sort_keys=True), flush=True)
