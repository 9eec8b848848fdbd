-- See the migration before: its own transaction, so writes go on while the rows are checked.
ALTER TABLE tasks VALIDATE CONSTRAINT tasks_description_length;
