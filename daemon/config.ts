// `--config FILE`: JSON, or the YAML subset a config file needs (mappings by
// indentation, lists, scalars, comments). Keys are the long flag names; flags win.
import { readFileSync } from 'node:fs';
import { Errors } from './errors.js';

type Value = string | number | boolean | null | Value[] | { [k: string]: Value };

function scalar(raw: string): Value {
  const s = raw.trim();
  if (s === '' || s === '~' || s === 'null') return null;
  if (s === 'true' || s === 'yes' || s === 'on') return true;
  if (s === 'false' || s === 'no' || s === 'off') return false;
  if (/^[-+]?\d+(\.\d+)?$/.test(s)) return Number(s);
  if ((s.startsWith('"') && s.endsWith('"')) || (s.startsWith("'") && s.endsWith("'"))) {
    return s.startsWith('"') ? (JSON.parse(s) as string) : s.slice(1, -1).replace(/''/g, "'");
  }
  if (s.startsWith('[') && s.endsWith(']')) {
    const inner = s.slice(1, -1).trim();
    return inner === '' ? [] : inner.split(',').map((x) => scalar(x));
  }
  return s;
}

function stripComment(line: string): string {
  let quote = '';
  for (let i = 0; i < line.length; i++) {
    const c = line[i]!;
    if (quote) {
      if (c === quote) quote = '';
    } else if (c === '"' || c === "'") quote = c;
    else if (c === '#' && (i === 0 || /\s/.test(line[i - 1]!))) return line.slice(0, i);
  }
  return line;
}

interface Line {
  indent: number;
  text: string;
  no: number;
}

export function parseYaml(text: string): Value {
  const lines: Line[] = [];
  text.split(/\r?\n/).forEach((raw, i) => {
    const t = stripComment(raw).replace(/\s+$/, '');
    if (t.trim() === '' || t.trim() === '---') return;
    if (/^\t/.test(t)) throw Errors.badConfig(`line ${i + 1}: tabs are not allowed for indentation`);
    lines.push({ indent: t.length - t.trimStart().length, text: t.trim(), no: i + 1 });
  });
  let pos = 0;
  const block = (indent: number): Value => {
    const first = lines[pos];
    if (!first || first.indent < indent) return null;
    if (first.text.startsWith('- ') || first.text === '-') {
      const list: Value[] = [];
      while (pos < lines.length && lines[pos]!.indent === first.indent && lines[pos]!.text.startsWith('-')) {
        const item = lines[pos]!.text.slice(1).trim();
        pos++;
        list.push(item === '' ? block(first.indent + 1) : scalar(item));
      }
      return list;
    }
    const map: { [k: string]: Value } = {};
    while (pos < lines.length && lines[pos]!.indent === first.indent) {
      const l = lines[pos]!;
      const m = /^("[^"]*"|'[^']*'|[^:]+?)\s*:(?:\s+(.*))?$/.exec(l.text);
      if (!m) throw Errors.badConfig(`line ${l.no}: expected "key: value"`);
      const key = String(scalar(m[1]!));
      pos++;
      map[key] = m[2] === undefined || m[2] === '' ? block(first.indent + 1) : scalar(m[2]);
    }
    if (pos < lines.length && lines[pos]!.indent > first.indent) {
      throw Errors.badConfig(`line ${lines[pos]!.no}: unexpected indentation`);
    }
    return map;
  };
  const v = block(0);
  if (pos < lines.length) throw Errors.badConfig(`line ${lines[pos]!.no}: unexpected indentation`);
  return v;
}

/** Loads a config file for yargs' `.config()`: an object of long option names. */
export function loadConfig(path: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw Errors.badConfig(`cannot read config ${path}: ${(err as Error).message}`);
  }
  let v: Value;
  if (/\.json$/i.test(path) || text.trimStart().startsWith('{')) {
    try {
      v = JSON.parse(text) as Value;
    } catch (err) {
      throw Errors.badConfig(`config ${path} is not valid JSON: ${(err as Error).message}`);
    }
  } else {
    v = parseYaml(text);
  }
  if (v === null) return {};
  if (typeof v !== 'object' || Array.isArray(v)) throw Errors.badConfig(`config ${path} must be a mapping of option names`);
  // yargs would split nested keys at dots (an export named "snap.1"), so the
  // exports section travels as JSON text, as --exports takes it.
  if (v.exports !== undefined && v.exports !== null && typeof v.exports === 'object') return { ...v, exports: JSON.stringify(v.exports) };
  return v;
}
